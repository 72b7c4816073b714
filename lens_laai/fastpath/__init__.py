"""Running the model cheaply: the last-token prefix cache, block replay, kernels, the one scorer and cost accounting.

* :mod:`~lens_laai.fastpath.prefix`: :class:`LastTokenCache`, what Δ at (layer, last token) cannot change;
* :mod:`~lens_laai.fastpath.blocks`: recording what a full forward passed each block and replaying
  blocks from a layer up (:class:`BlockReplayModel` answers TransformerLens' patching functions);
* :mod:`~lens_laai.fastpath.runner`: :class:`LayerRunner` (logits of fixed batches under a Δ) and
  :func:`cached_runner`;
* :mod:`~lens_laai.fastpath.cost`: :class:`CostMeter`, compute in forward-pass equivalents;
* :mod:`~lens_laai.fastpath.kernels`, :mod:`~lens_laai.fastpath.scoring`,
  :mod:`~lens_laai.fastpath.recording`: plain-tensor kernels, the one scorer, last-token ``hook_z``.

Import these names from ``lens_laai.fastpath``; the modules behind them may move.
"""

from lens_laai.fastpath.blocks import (
    BlockCall,
    BlockReplayModel,
    ReplayUnsupported,
    block_index,
    record_block_calls,
    recording_problems,
    replay_logits,
)
from lens_laai.fastpath.cost import CostMeter
from lens_laai.fastpath.notices import warn_once
from lens_laai.fastpath.prefix import TOLERANCE, LastTokenCache, tolerance
from lens_laai.fastpath.recording import last_token_z
from lens_laai.fastpath.runner import LayerRunner, block_device, cached_runner
from lens_laai.fastpath.scoring import score_logits

__all__ = [
    "TOLERANCE",
    "BlockCall",
    "BlockReplayModel",
    "CostMeter",
    "LastTokenCache",
    "LayerRunner",
    "ReplayUnsupported",
    "block_device",
    "block_index",
    "cached_runner",
    "last_token_z",
    "record_block_calls",
    "recording_problems",
    "replay_logits",
    "score_logits",
    "tolerance",
    "warn_once",
]
