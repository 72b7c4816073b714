"""Where an intervention acts along the sequence, and how ``"last"`` finds each row's last real token.

Positions are one of:

* ``"last"``: the last *real* (non-padding) token of each row. With left padding, or one
  unpadded prompt, that is position ``-1``. With right padding it is found from the attention
  mask: pass ``attention_mask`` to ``fwd_hooks`` / ``apply``, or let ``apply`` read it (it
  watches the model's forward for an ``attention_mask`` argument and for batches of strings,
  which the bridge pads on the tokenizer's side).
* ``"all"``: every position.
* a tuple of distinct ints (negative counts from the end), indices into the sequence that the
  hook sees. Negative ones (a fit's ``last_positions``: ``(-3, -2, -1)``) are each row's last real
  tokens with left padding (as :func:`lens_laai.evaluate` and :func:`lens_laai.generate` pad) or one
  prompt; on a right-padded batch (seen by ``apply``, or passed to ``fwd_hooks`` as its
  ``attention_mask``) they are refused rather than put on padding.

Generation: :func:`lens_laai.generate` adds Δ at the last prompt token only (as in training),
or also at every generated token (``delta_at="every_token"``), and computes the same thing with
and without the KV cache. TransformerBridge's own ``model.generate`` inside ``iv.apply(model)``
does not: with the KV cache each forward call sees only the new token, so ``"last"`` is the newest
token at every step (Δ at the last prompt token and every generated token, each kept in the cache);
without the cache each call re-runs the whole sequence and ``"last"`` is only its final token, so
earlier tokens lose Δ. Integer positions index the tokens a call sees (the new ones, under a cache).
Use :func:`lens_laai.generate` for results that do not depend on the cache.

Example:
    >>> import torch
    >>> from lens_laai.interventions.positions import add_at_positions, last_real_index
    >>> mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])          # right padding
    >>> last_real_index(mask).tolist()
    [2, 3]
    >>> z = torch.zeros(2, 4, 1, 1)
    >>> add_at_positions(z, torch.ones(1, 1), last_real_index(mask))[:, :, 0, 0].tolist()
    [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeGuard

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_laai.errors import InterventionError

Positions = str | tuple[int, ...]


def check_positions(positions: Any) -> Positions:
    """Normalise ``positions`` (a list becomes a tuple) or raise :class:`InterventionError`.

    Example:
        >>> from lens_laai.interventions.positions import check_positions
        >>> check_positions("last"), check_positions([0, -1])
        ('last', (0, -1))
    """
    if isinstance(positions, str):
        if positions not in ("last", "all"):
            raise InterventionError(f"positions must be 'last', 'all' or a tuple of ints, got {positions!r}.")
        return positions
    if isinstance(positions, (list, tuple)):
        bad = [p for p in positions if not isinstance(p, int) or isinstance(p, bool)]
        if bad or not positions:
            raise InterventionError(
                f"positions must be 'last', 'all' or a non-empty tuple of ints, got {positions!r}"
                + (f" ({bad[0]!r} is not an int)." if bad else ".")
            )
        if len(set(positions)) != len(positions):
            raise InterventionError(f"positions {positions!r} repeat an index; give each position once.")
        return tuple(int(p) for p in positions)
    raise InterventionError(f"positions must be 'last', 'all' or a tuple of ints, got {type(positions).__name__}.")


def last_positions(m: int) -> Positions:
    """The positions of Δ at each row's last ``m`` prompt tokens: ``"last"`` for one, else ``(-m, …, -1)``
    (with left padding, as evaluation and generation pad, those are every row's last ``m`` real tokens).

    Example:
        >>> from lens_laai.interventions.positions import last_positions
        >>> last_positions(1), last_positions(3)
        ('last', (-3, -2, -1))
    """
    return "last" if m == 1 else tuple(range(-m, 0))


def tail_of(positions: Positions) -> int | None:
    """How many last positions ``positions`` reach back (``"last"``: 1; negative indices: the deepest),
    which the fast path recomputes; ``None`` for ``"all"`` or any non-negative index.

    Example:
        >>> from lens_laai.interventions.positions import tail_of
        >>> tail_of("last"), tail_of((-3, -1)), tail_of((0, -1)), tail_of("all")
        (1, 3, None, None)
    """
    if positions == "last":
        return 1
    if isinstance(positions, tuple) and positions and max(positions) < 0:
        return -min(positions)
    return None


def counts_back(where: Any) -> TypeGuard[tuple[int, ...]]:
    """Whether ``where`` is a tuple of negative positions, counted back from each row's end.

    Example:
        >>> from lens_laai.interventions.positions import counts_back
        >>> counts_back((-3, -2, -1)), counts_back((0, -1)), counts_back("last")
        (True, False, False)
    """
    return isinstance(where, tuple) and bool(where) and tail_of(where) is not None


def positions_to_json(positions: Positions) -> str | list[int]:
    """``positions`` as a manifest stores them: the string, or a list of ints.

    Example:
        >>> from lens_laai.interventions.positions import positions_to_json
        >>> positions_to_json("last"), positions_to_json((0, -1))
        ('last', [0, -1])
    """
    return positions if isinstance(positions, str) else list(positions)


def positions_from_json(value: Any) -> Positions:
    """Positions read back from a manifest, checked as :func:`check_positions` checks them.

    Example:
        >>> from lens_laai.interventions.positions import positions_from_json, positions_to_json
        >>> positions_from_json("last"), positions_from_json(positions_to_json((2, -1)))
        ('last', (2, -1))
        >>> positions_from_json([1, 1])
        Traceback (most recent call last):
        ...
        lens_laai.errors.InterventionError: positions (1, 1) repeat an index; give each position once.
    """
    return check_positions(value if isinstance(value, str) else tuple(value) if isinstance(value, list) else value)


def last_real_index(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Index of each row's last non-padding token (any padding side).

    Example:
        >>> import torch
        >>> from lens_laai.interventions.positions import last_real_index
        >>> last_real_index(torch.tensor([[0, 1, 1], [1, 1, 0]])).tolist()  # left and right padding
        [2, 1]
    """
    mask = attention_mask.bool()
    if not mask.any(-1).all():
        raise InterventionError("A row of the attention mask is all padding; it has no last real token.")
    idx = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask, idx, -1).max(-1).values


def add_at_positions(
    z: Float[Tensor, "batch pos ..."],
    delta: Float[Tensor, ...],
    positions: Positions | Int[Tensor, " batch"],
) -> Float[Tensor, "batch pos ..."]:
    """Return ``z`` with ``delta`` added at ``positions`` (a new tensor; ``z`` is untouched).

    ``positions`` is ``"last"`` (position -1 here: callers resolve padding first), ``"all"``, a
    tuple of indices, or a ``[batch]`` tensor with one index per row.

    Example:
        >>> import torch
        >>> from lens_laai.interventions.positions import add_at_positions
        >>> z = torch.zeros(1, 3, 1, 1)  # [batch, pos, head, d_head]
        >>> add_at_positions(z, torch.ones(1, 1), (0, -1))[0, :, 0, 0].tolist(), z.sum().item()  # z itself untouched
        ([1.0, 0.0, 1.0], 0.0)
        >>> add_at_positions(z, torch.ones(1, 1), (3,))
        Traceback (most recent call last):
        ...
        lens_laai.errors.InterventionError: Positions [3] are outside this sequence of 3 tokens.
    """
    delta = delta.to(dtype=z.dtype, device=z.device)
    if isinstance(positions, str) and positions == "all":
        return z + delta
    seq = z.shape[1]
    out = z.clone()
    if isinstance(positions, Tensor):
        positions = positions.to(z.device)
        if positions.shape != (z.shape[0],) or bool(((positions >= seq) | (positions < -seq)).any()):
            raise InterventionError(
                f"Per-row positions {positions.tolist()} do not fit a batch of {z.shape[0]} rows of length {seq}."
            )
        out[torch.arange(z.shape[0], device=z.device), positions] += delta
    elif isinstance(positions, str):  # "last" (check_positions admits no other string but "all")
        out[:, -1] += delta
    else:
        outside = [p for p in positions if not -seq <= p < seq]
        if outside:
            raise InterventionError(f"Positions {outside} are outside this sequence of {seq} tokens.")
        out[:, list(positions)] += delta
    return out


class LastTokenTracker:
    """Watches a model's forward calls and knows each row's last real token for ``"last"``.

    The bridge is either given ``attention_mask`` explicitly, which this tracker records, or a
    batch of strings, which it pads on the tokenizer's side; for right padding the tracker
    rebuilds that padding's mask with the model's own tokenizer.

    Example:
        >>> import torch
        >>> from lens_laai.interventions.positions import LastTokenTracker
        >>> z = torch.zeros(2, 4, 1, 1)  # [batch, pos, head, d_head]
        >>> LastTokenTracker(None, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])).index(z).tolist()  # right padding
        [2, 3]
        >>> LastTokenTracker(None, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])).index(z)  # left padding: -1 for all
        'last'
    """

    def __init__(self, model: Any, attention_mask: Tensor | None = None, back: tuple[int, ...] | None = None) -> None:
        self.model = model
        self.mask: Tensor | None = attention_mask
        self.back = back

    def index(self, z: Tensor) -> Positions | Tensor:
        """Per-row indices into ``z`` of the last real token, or ``"last"`` when that is -1.

        Built with ``back`` (negative positions, e.g. a fit's ``(-3, -2, -1)``), ``back`` itself,
        after checking that every row ends at the last position: on a right-padded batch those
        positions would fall on padding, which is refused with an :class:`InterventionError`.
        """
        if self.back is not None:
            if self.mask is not None and not bool((last_real_index(self.mask) == self.mask.shape[-1] - 1).all()):
                raise InterventionError(
                    f"Positions {self.back} count back from the end of each row, but this batch is right-padded, "
                    "so they would fall on padding. Pad on the left (tokenizer.padding_side = 'left'), run one "
                    "prompt at a time, or use lens_laai.evaluate / generate, which pad on the left."
                )
            return self.back
        if self.mask is None:
            return "last"
        last = last_real_index(self.mask.to(z.device))
        offset = self.mask.shape[-1] - z.shape[1]  # earlier tokens live in a KV cache
        if bool((last == self.mask.shape[-1] - 1).all()):
            return "last"
        return last - offset

    @contextmanager
    def watching(self) -> Iterator[LastTokenTracker]:
        """Record the mask of every forward call of the model inside the block."""
        handle = self.model.register_forward_pre_hook(self._record, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()
            self.mask = None

    def _record(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.mask = kwargs.get("attention_mask")
        inputs = args[0] if args else kwargs.get("input")
        if (
            self.mask is None
            and isinstance(inputs, (list, tuple))
            and len(inputs) > 1
            and all(isinstance(s, str) for s in inputs)
        ):
            self.mask = self._string_batch_mask(list(inputs), kwargs)

    def _string_batch_mask(self, texts: list[str], kwargs: dict) -> Tensor | None:
        side = kwargs.get("padding_side") or getattr(self.model.tokenizer, "padding_side", "right")
        if side != "right":
            return None
        lengths = [self.model.to_tokens(t, prepend_bos=kwargs.get("prepend_bos")).shape[-1] for t in texts]
        width = max(lengths)
        return torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
