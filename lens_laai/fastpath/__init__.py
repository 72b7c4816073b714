"""Running the model cheaply: the last-token prefix cache, block replay, kernels, the one scorer and cost accounting.

Import these names from ``lens_laai.fastpath``; the modules behind them may move.
"""

from lens_laai.fastpath.runner import CostMeter, LastTokenCache, LayerRunner, block_device, tolerance, warn_once

__all__ = ["CostMeter", "LastTokenCache", "LayerRunner", "block_device", "tolerance", "warn_once"]
