"""How a fitted intervention is meant to be used: how many demonstrations its prompts carry, and whether Δ is added.

A fit chooses among zero-shot Δ (the paper's setting), k-shot prompting alone and k-shot prompting
with Δ by cross-validation on its n pairs (:mod:`lens_laai.fitting.modes`) and records the winner
in the intervention's metadata; :func:`lens_laai.evaluate` and :func:`lens_laai.generate` use it
unless told otherwise. The demonstrations of a k-shot mode always come from the fit's own
training pairs. Interventions made by algebra (``a + b``) carry no mode: they act zero-shot.

Example:
    >>> from lens_laai.interventions.mode import Mode
    >>> Mode(0, True).name, Mode(5, False).name, Mode(5, True).name
    ('zero-shot Δ', '5-shot prompting', '5-shot prompting + Δ')
    >>> Mode.from_json(Mode(5, True, (("hot", "cold"),)).to_json()) == Mode(5, True, (("hot", "cold"),))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lens_laai.errors import InterventionError

Pair = tuple[str, str]


@dataclass(frozen=True)
class Mode:
    """``shots`` demonstrations in each prompt; Δ added when ``delta``; ``demonstrations``: the fixed
    k pairs (from the training pairs) that :func:`lens_laai.generate` puts before a prompt.

    Example:
        >>> from lens_laai.interventions.mode import Mode
        >>> Mode(2, True, (("hot", "cold"), ("up", "down"))).to_json()
        {'shots': 2, 'delta': True, 'demonstrations': [['hot', 'cold'], ['up', 'down']]}
    """

    shots: int = 0
    delta: bool = True
    demonstrations: tuple[Pair, ...] = ()

    @property
    def name(self) -> str:
        if self.shots == 0:
            return "zero-shot Δ" if self.delta else "zero-shot prompting"
        return f"{self.shots}-shot prompting" + (" + Δ" if self.delta else "")

    def to_json(self) -> dict[str, Any]:
        return {"shots": self.shots, "delta": self.delta, "demonstrations": [list(p) for p in self.demonstrations]}

    @classmethod
    def from_json(cls, data: Any) -> Mode:
        """A mode from its JSON record; a malformed one raises :class:`InterventionError` naming the problem."""
        try:
            shots, delta = data["shots"], data["delta"]
            demos = tuple((str(x), str(y)) for x, y in data.get("demonstrations", []))
        except (KeyError, TypeError, ValueError) as err:
            raise InterventionError(f"A recorded mode is malformed ({err!r}): {data!r}") from None
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0 or not isinstance(delta, bool):
            raise InterventionError(f"A recorded mode needs shots (an integer ≥ 0) and delta (true/false): {data!r}")
        return cls(shots, delta, demos)

    @classmethod
    def of(cls, metadata: dict[str, Any]) -> Mode | None:
        """The mode an intervention's ``metadata`` records (``None``: none recorded, e.g. a sum of fits).

        Example:
            >>> from lens_laai.interventions.mode import Mode
            >>> Mode.of({"mode": {"shots": 5, "delta": True}}).name, Mode.of({})
            ('5-shot prompting + Δ', None)
        """
        record = metadata.get("mode")
        return None if record is None else cls.from_json(record)


ZERO_SHOT = Mode(0, True)
"""The paper's mode: zero-shot prompts, Δ added."""
