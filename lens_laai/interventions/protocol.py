"""The intervention protocol: what every intervention object offers, and the shared implementation.

:class:`lens_laai.HeadIntervention` (Δ on ``hook_z``), :class:`lens_laai.baselines.ResidualIntervention`
(a vector on the residual stream) and the ablations share it, so evaluation, generation, the CLI
and analysis treat them alike:

* ``fwd_hooks(positions=None, attention_mask=None)``: a TransformerLens ``fwd_hooks`` list;
* ``apply(model, scale=1.0)``: a context manager; the hooks live only inside the block, also on
  an exception, and ``"last"`` follows the attention mask of each forward call;
* ``check_model(model, strict=False)``: refuse a model of another shape, warn on other weights;
* ``save(path, force=False)`` / ``load(path, model=None)``: safetensors + a JSON manifest, atomic,
  never pickle, refusing to overwrite anything that is not one of our saves;
* algebra (``a + b``, ``a - b``, ``2.0 * a``, ``-a``) that keeps the record of the data every
  operand was fitted on (``metadata["data"]``), so evaluation can still refuse training pairs;
* ``to(device, dtype)``.

Subclasses say what their tensors are (``_tensors``, ``_with_tensors``), how two combine
(``_combined_tensors``) and what hooks they make (``_hooks``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import (
    Any,
    ClassVar,
    Protocol,
    TypeVar,
    runtime_checkable,
)

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from lens_laai.errors import InterventionError
from lens_laai.interventions.positions import (
    LastTokenTracker,
    Positions,
    add_at_positions,
    check_positions,
    counts_back,
    positions_to_json,
)
from lens_laai.models.bridge import SHAPE_KEYS, check_fingerprint
from lens_laai.storage.bundle import load_bundle, save_bundle
from lens_laai.storage.schema import validate_manifest
from lens_laai.tasks.provenance import merged_survey_record

Hook = tuple[str, Callable[..., Any]]
Where = Positions | Tensor | LastTokenTracker
T = TypeVar("T", bound="InterventionBase")
CARRIED_METADATA = ("data", "template", "survey", "opinion_prompt")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@runtime_checkable
class Intervention(Protocol):
    """What evaluation, generation and analysis need of any intervention.

    Example:
        >>> from lens_laai import HeadAblation, HeadIntervention, Intervention
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> isinstance(HeadIntervention.zeros(model, 1), Intervention), isinstance(HeadAblation.zero(model, [(1, 0)]), Intervention)
        (True, True)
    """

    metadata: dict[str, Any]
    positions: Positions

    @property
    def layers(self) -> list[int]: ...

    def fwd_hooks(self, positions: Positions | None = None, attention_mask: Tensor | None = None) -> list[Hook]: ...

    def apply(self, model: TransformerBridge, scale: float = 1.0, positions: Positions | None = None): ...

    def check_model(self, model: TransformerBridge, strict: bool = False) -> None: ...


class InterventionBase:
    """Shared implementation of the protocol; subclasses are dataclasses with these attributes.

    Example:
        >>> import lens_laai
        >>> from lens_laai.interventions.protocol import InterventionBase
        >>> sorted(InterventionBase.registry)  # each kind registers the format its saves name
        ['lens_laai.HeadAblation', 'lens_laai.HeadIntervention', 'lens_laai.ResidualIntervention']
    """

    FORMAT: ClassVar[str]
    TENSOR_STEM: ClassVar[str]
    registry: ClassVar[dict[str, type[InterventionBase]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "FORMAT" in cls.__dict__:
            InterventionBase.registry[cls.FORMAT] = cls

    model_name: str
    fingerprint: dict[str, Any]
    positions: Positions
    metadata: dict[str, Any]

    # to implement --------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        raise NotImplementedError

    def _tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _with_tensors(self: T, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> T:
        raise NotImplementedError

    def _combined_tensors(self, other: Any, sign: float) -> dict[str, Tensor]:
        raise NotImplementedError

    def _hooks(self, where: Where) -> list[Hook]:
        raise NotImplementedError

    def _manifest_extra(self) -> dict[str, Any]:
        return {}

    # hooks -------------------------------------------------------------------------------------
    def fwd_hooks(self, positions: Positions | None = None, attention_mask: Tensor | None = None) -> list[Hook]:
        """A TransformerLens ``fwd_hooks`` list, for ``model.run_with_hooks`` or ``model.hooks``.

        With ``positions="last"`` (the default) and right-padded batches, pass ``attention_mask``
        so each row gets its own last real token; without it ``"last"`` is position -1. Negative
        positions (a fit's ``last_positions``) count back from the end; given a right-padded
        ``attention_mask`` (or, in ``apply``, a right-padded batch) they are refused, not put on padding.
        """
        self.check_values()
        where = check_positions(self.positions if positions is None else positions)
        back = where if counts_back(where) else None
        if attention_mask is not None and (where == "last" or back is not None):
            return self._hooks(LastTokenTracker(None, attention_mask, back))
        return self._hooks(where)

    @contextmanager
    def apply(
        self, model: TransformerBridge, scale: float = 1.0, positions: Positions | None = None, strict: bool = False
    ) -> Iterator[TransformerBridge]:
        """Context manager: the model computes with this intervention (times ``scale``) inside the block.

        On exit, also after an exception, exactly the hooks added here are removed; the caller's
        own hooks stay. ``"last"`` is each row's last real token of every forward call, read from
        the ``attention_mask`` the model is given (or builds for a batch of strings).
        """
        self.check_model(model, strict)
        self.check_values()
        scaled = self if scale == 1.0 else self * scale
        where = check_positions(self.positions if positions is None else positions)
        tracker = LastTokenTracker(model, back=where if counts_back(where) else None)
        watched = where == "last" or counts_back(where)
        with tracker.watching(), model.hooks(fwd_hooks=scaled._hooks(tracker if watched else where)):
            yield model

    def check_model(self, model: TransformerBridge, strict: bool = False) -> None:
        """Refuse ``model`` unless its shapes match; warn (refuse if ``strict``) when its weights differ."""
        check_fingerprint(self.fingerprint, self.model_name, model, strict)

    def check_values(self) -> None:
        """Refuse tensors edited in place since construction: NaN / infinite values, or a dtype we do not save.

        :meth:`save` calls it before writing anything (so a good save is never replaced by a broken
        one), and :meth:`apply` / :meth:`fwd_hooks` before adding hooks (so evaluation raises
        rather than scoring a broken intervention).
        """
        for name, tensor in self._tensors().items():
            check_float_tensor(f"{type(self).__name__} tensor {name!r}", tensor)

    # algebra -----------------------------------------------------------------------------------
    def __add__(self: T, other: T) -> T:
        return self._combine(other, 1.0, "+")

    def __sub__(self: T, other: T) -> T:
        return self._combine(other, -1.0, "-")

    def __mul__(self: T, scale: float) -> T:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            return NotImplemented
        if not math.isfinite(scale):
            raise InterventionError(f"Cannot scale an intervention by {scale}: the scale must be a finite number.")
        name = f"{float(scale):g}·({self.metadata.get('name', 'a')})"
        return self._with_tensors({k: t * float(scale) for k, t in self._tensors().items()}, self._derived(name))

    __rmul__ = __mul__

    def __neg__(self: T) -> T:
        return self * -1.0

    def _combine(self: T, other: Any, sign: float, op: str) -> T:
        if isinstance(other, InterventionBase) and type(other) is not type(self):
            raise InterventionError(
                f"Cannot combine a {type(self).__name__} with a {type(other).__name__}; "
                "apply them together instead (evaluate(model, task, [a, b]) or nested apply())."
            )
        if type(other) is not type(self):
            return NotImplemented
        for what, ours, theirs in (
            ("models", self._shapes(), other._shapes()),
            ("positions", self.positions, other.positions),
        ):
            if ours != theirs:
                raise InterventionError(
                    f"Cannot combine interventions for different {what} ({ours!r} vs {theirs!r}); "
                    "rebuild one to match the other."
                )
        name = f"({self.metadata.get('name', 'a')}) {op} ({other.metadata.get('name', 'b')})"
        return self._with_tensors(self._combined_tensors(other, sign), self._derived(name, other))

    def _derived(self, name: str, other: InterventionBase | None = None) -> dict[str, Any]:
        """Metadata of a result of algebra: its name, and every operand's data records and template."""
        out: dict[str, Any] = {"name": name}
        records = list(self.metadata.get("data", []))
        if other is not None:
            records += [r for r in other.metadata.get("data", []) if r not in records]
        if records:
            out["data"] = records
        operands = (self.metadata, other.metadata if other else {})
        for key in ("template", "opinion_prompt"):
            values = [m[key] for m in operands if key in m]
            if values and all(v == values[0] for v in values):
                out[key] = values[0]
        surveys = [m["survey"] for m in operands if isinstance(m.get("survey"), dict)]
        if surveys:
            out["survey"] = merged_survey_record(surveys)
        return out

    def _shapes(self) -> dict[str, Any]:
        return {k: self.fingerprint.get(k) for k in SHAPE_KEYS}

    def to(self: T, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> T:
        """A copy with every tensor moved to ``device`` and/or cast to ``dtype``."""
        return self._with_tensors(
            {k: t.to(device=device, dtype=dtype) for k, t in self._tensors().items()}, dict(self.metadata)
        )

    # persistence -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write ``path/`` (safetensors + ``manifest.json``) atomically; refuse a path that is not our save.

        ``force=True`` writes into an existing directory that is not one of our saves, deleting
        nothing of what is there. Tensors that are not finite floats are refused before anything
        is written, so the save already at ``path`` survives.
        """
        self.check_values()
        manifest = {
            "format": self.FORMAT,
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "positions": positions_to_json(self.positions),
            **self._manifest_extra(),
            "metadata": self.metadata,
            **versions(),
        }
        tensors = {k: t.detach().to("cpu", torch.float32) for k, t in self._tensors().items()}
        return save_bundle(Path(path), tensors, manifest, self.TENSOR_STEM, force=force)

    @classmethod
    def _expects_tensors(cls, manifest: dict[str, Any]) -> bool:
        """Whether a save of this kind must hold tensors (a zero ablation holds none)."""
        return True

    @classmethod
    def load(cls: type[T], path: str | os.PathLike, model: TransformerBridge | None = None, strict: bool = False) -> T:
        """Read what :meth:`save` wrote (never pickle); with ``model``, check that it fits."""
        tensors, manifest = load_bundle(Path(path), cls.FORMAT, cls.TENSOR_STEM, check=validate_manifest)
        where = f"{Path(path) / 'manifest.json'}"
        if not tensors and cls._expects_tensors(manifest):
            raise InterventionError(f"{Path(path)}: the tensor file holds no tensors; the save is damaged.")
        for name, tensor in tensors.items():
            try:
                check_float_tensor(f"tensor {name!r}", tensor)
            except InterventionError as err:
                raise InterventionError(f"{where}: {err}") from None
        try:
            iv = cls._from_saved(tensors, manifest)
        except InterventionError as err:
            raise InterventionError(f"{Path(path)}: {err}") from None
        if model is not None:
            iv.check_model(model, strict)
        return iv

    @classmethod
    def _from_saved(cls: type[T], tensors: dict[str, Tensor], manifest: dict[str, Any]) -> T:
        """Build from a checked manifest (``positions`` still in JSON form: see :func:`positions_from_json`)."""
        raise NotImplementedError


def load_intervention(
    path: str | os.PathLike, model: TransformerBridge | None = None, strict: bool = False
) -> InterventionBase:
    """Load any saved intervention (head, residual, ablation), whichever kind the manifest names.

    Example:
        >>> import tempfile
        >>> from lens_laai import HeadAblation, load_intervention
        >>> from lens_laai.testing import tiny_model
        >>> model = tiny_model()
        >>> path = HeadAblation.zero(model, [(1, 0)]).save(tempfile.mkdtemp() + "/ablation")
        >>> loaded = load_intervention(path, model=model)
        >>> type(loaded).__name__, loaded.heads
        ('HeadAblation', [(1, 0)])
    """
    fmt = saved_format(Path(path))
    kind = InterventionBase.registry.get(fmt) if isinstance(fmt, str) else None
    if kind is None:
        known = ", ".join(sorted(InterventionBase.registry))
        raise InterventionError(
            f"{path} is not a saved intervention (no readable manifest.json naming one of: {known})."
        )
    return kind.load(path, model, strict)


def by_layer(tensors: dict[str, Tensor]) -> dict[int, Tensor]:
    """``{"layer.N": t}`` as ``{N: t}``; refuse any other name, and two names for one layer ("layer.1", "layer.01").

    Example:
        >>> import torch
        >>> from lens_laai.interventions.protocol import by_layer
        >>> sorted(by_layer({"layer.3": torch.zeros(2), "layer.1": torch.ones(2)}))
        [1, 3]
    """
    out: dict[int, Tensor] = {}
    for name, tensor in tensors.items():
        prefix, _, index = name.partition(".")
        if prefix != "layer" or not index.isdigit() or str(int(index)) != index or int(index) in out:
            raise InterventionError(f"tensor name {name!r} is not 'layer.N' for a distinct layer N.")
        out[int(index)] = tensor
    return out


def check_tensor(name: str, tensor: Any, shape: tuple[int, ...]) -> Tensor:
    """Refuse anything but a finite floating tensor of ``shape``.

    Example:
        >>> import torch
        >>> from lens_laai.interventions.protocol import check_tensor
        >>> check_tensor("Δ", torch.zeros(4, 16), (4, 16)).shape
        torch.Size([4, 16])
        >>> check_tensor("Δ", torch.zeros(4, 8), (4, 16))
        Traceback (most recent call last):
        ...
        lens_laai.errors.InterventionError: Δ has shape (4, 8), expected (4, 16).
    """
    check_float_tensor(name, tensor, check_finite=False)
    if tuple(tensor.shape) != shape:
        raise InterventionError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}.")
    return check_float_tensor(name, tensor)


def check_float_tensor(name: str, tensor: Any, check_finite: bool = True) -> Tensor:
    """Refuse anything but a tensor of float16, bfloat16, float32 or float64 (and, by default, finite).

    Example:
        >>> import torch
        >>> from lens_laai.interventions.protocol import check_float_tensor
        >>> check_float_tensor("Δ", torch.tensor([1.0, float("nan")]))
        Traceback (most recent call last):
        ...
        lens_laai.errors.InterventionError: Δ holds NaN or infinite values; an intervention must be finite.
    """
    if not isinstance(tensor, Tensor) or tensor.dtype not in FLOAT_DTYPES:
        got = getattr(tensor, "dtype", type(tensor).__name__)
        raise InterventionError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {got}.")
    if check_finite and not bool(torch.isfinite(tensor.detach()).all()):
        raise InterventionError(f"{name} holds NaN or infinite values; an intervention must be finite.")
    return tensor


def saved_format(path: Path) -> str | None:
    """The ``format`` a save's manifest names (None if it has no manifest, or names none); read safely.

    A manifest that is not a readable regular file of JSON raises :class:`InterventionError` saying why.

    Example:
        >>> import tempfile
        >>> from lens_laai import HeadAblation
        >>> from lens_laai.interventions.protocol import saved_format
        >>> from lens_laai.testing import tiny_model
        >>> path = HeadAblation.zero(tiny_model(), [(1, 0)]).save(tempfile.mkdtemp() + "/ablation")
        >>> saved_format(path), saved_format(path.parent)  # a folder without a manifest: None
        ('lens_laai.HeadAblation', None)
    """
    from lens_laai.storage.safe_read import loads_json, read_regular_file

    manifest_path = path / "manifest.json"
    if not os.path.lexists(manifest_path):
        return None
    raw = read_regular_file(manifest_path, InterventionError, max_bytes=64 * 2**20)
    manifest = loads_json(raw, str(manifest_path), InterventionError)
    return manifest.get("format") if isinstance(manifest, dict) else None


def adder_hook(value: Tensor, where: Where) -> Callable[..., Tensor]:
    """A hook function adding ``value`` at ``where`` (positions, per-row indices, or a tracker).

    Example:
        >>> import torch
        >>> from lens_laai.interventions.protocol import adder_hook
        >>> hook = adder_hook(torch.ones(1), (0,))  # add 1 at position 0
        >>> hook(torch.zeros(1, 3, 1), None)[0, :, 0].tolist()
        [1.0, 0.0, 0.0]
    """

    def hook(activation: Tensor, hook: Any) -> Tensor:
        positions = where.index(activation) if isinstance(where, LastTokenTracker) else where
        return add_at_positions(activation, value, positions)

    return hook


def versions() -> dict[str, str]:
    """Library versions recorded in every manifest.

    Example:
        >>> from lens_laai.interventions.protocol import versions
        >>> sorted(versions())
        ['lens_laai_version', 'transformer_lens_version']
    """
    import transformer_lens

    from lens_laai.version import __version__

    return {
        "lens_laai_version": __version__,
        "transformer_lens_version": getattr(transformer_lens, "__version__", "unknown"),
    }
