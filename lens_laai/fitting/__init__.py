"""Fitting Δ: the objective, the sparse-group-lasso solver, λ paths, layer policy and selection on the n pairs."""
