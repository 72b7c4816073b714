"""Fitting Δ: the objective, the sparse-group-lasso solver, λ paths, layer policy and selection on the n pairs.

* :mod:`~lens_laai.fitting.fit`: :func:`~lens_laai.fit`, :func:`fit_path`, :class:`FitResult`, the settings
  (:class:`FitConfig`) and the one layer policy (:func:`default_layers`, :func:`auto_layer`);
* :mod:`~lens_laai.fitting.layer_fit`: the objective and the λ₂ path at one layer;
* :mod:`~lens_laai.fitting.solver`: FISTA with the sparse-group-lasso proximal step;
* :mod:`~lens_laai.fitting.selection`: k-fold cross-validation over (layer, λ₂) on the n pairs;
* :mod:`~lens_laai.fitting.penalties`: the λ₂ values a fit accepts.
"""

from lens_laai.fitting.fit import (
    FitConfig,
    FitResult,
    auto_layer,
    default_layers,
    fit_path,
    parse_layers,
)
from lens_laai.fitting.penalties import lambda_values
from lens_laai.fitting.selection import cross_validate, fold_splits

__all__ = [
    "FitConfig",
    "FitResult",
    "auto_layer",
    "cross_validate",
    "default_layers",
    "fit_path",
    "fold_splits",
    "lambda_values",
    "parse_layers",
]

# ``fit`` itself is ``lens_laai.fit``: exported here it would hide the module lens_laai.fitting.fit.
