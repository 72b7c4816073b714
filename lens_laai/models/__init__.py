"""Loading models (the embedded SmolLM2, hub names, local directories) and what we read off a bridge.

:func:`load_model` returns a frozen ``TransformerBridge``; :mod:`~lens_laai.models.bridge` reads
what every other subpackage needs from one (``hook_z`` names, ``W_O`` per head, a fingerprint that
saved interventions check). Tiny in-memory test models live in :mod:`~lens_laai.models.tiny`
(re-exported by :mod:`lens_laai.testing`).
"""

from lens_laai.models.bridge import (
    check_fingerprint,
    freeze,
    head_output_weights,
    hook_name,
    last_position_hooks,
    model_fingerprint,
    model_name,
)
from lens_laai.models.loading import load_model

__all__ = [
    "check_fingerprint",
    "freeze",
    "head_output_weights",
    "hook_name",
    "last_position_hooks",
    "load_model",
    "model_fingerprint",
    "model_name",
]
