"""Intervention objects and the protocol they share: head vectors, ablations, residual vectors.

Importing this package registers every kind, so :func:`load_intervention` reads any save.
"""

from lens_laai.interventions.ablation import HeadAblation
from lens_laai.interventions.head import HeadIntervention
from lens_laai.interventions.protocol import (
    Intervention,
    InterventionBase,
    load_intervention,
)
from lens_laai.interventions.residual import ResidualIntervention

__all__ = [
    "HeadAblation",
    "HeadIntervention",
    "Intervention",
    "InterventionBase",
    "ResidualIntervention",
    "load_intervention",
]
