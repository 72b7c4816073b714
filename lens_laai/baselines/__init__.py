"""Baselines for LAAI, run through the same task splits, prompts and metric as the core.

Every method is scored with :func:`lens_laai.evaluation.evaluate` (top-1 accuracy of the target's first token
at the last prompt position) and reports its cost in forward-pass equivalents (one full forward of
one zero-shot prompt, :class:`lens_laai.fastpath.CostMeter` semantics).

* Prompting (:mod:`.prompting`): zero-shot and k-shot prompting with demonstrations from the train
  split; :func:`prompting_cost` gives the per-query price of the longer prompt.
* Function Vectors (:mod:`.function_vectors`; Todd et al., ICLR 2024): mean head activations on
  clean k-shot prompts, causal indirect effect on shuffled-label prompts, the sum of the top heads'
  outputs added to the output of one layer (:class:`ResidualIntervention`), layer picked on
  validation.
* Mean difference (:mod:`.mean_difference`; ITI / ActAdd style): per-head mean of k-shot minus
  zero-shot ``hook_z`` at the last token, top-K heads by norm or separation, scaled by α picked on
  validation; returns a :class:`lens_laai.HeadIntervention`.

Example:
    >>> from lens_laai import evaluate
    >>> from lens_laai.baselines import fit_mean_difference, prompting_baseline
    >>> from lens_laai.testing import tiny_model, tiny_task
    >>> model, splits = tiny_model(), tiny_task().split(0, 8, 4)
    >>> md = fit_mean_difference(model, splits, layer=1, top_k=2, shots=3, progress=False)
    >>> evaluate(model, splits, md.intervention).n == prompting_baseline(model, splits, shots=3).n
    True
"""

from lens_laai.baselines.function_vectors import (
    FunctionVectorResult,
    causal_indirect_effect,
    fit_function_vector,
    function_vector,
    head_outputs,
    mean_head_activations,
    shuffled_label_batch,
    top_heads,
)
from lens_laai.baselines.mean_difference import (
    MeanDifferenceResult,
    fit_mean_difference,
    head_scores,
)
from lens_laai.baselines.prompting import prompting_baseline, prompting_cost
from lens_laai.interventions.residual import ResidualIntervention

__all__ = [
    "FunctionVectorResult",
    "MeanDifferenceResult",
    "ResidualIntervention",
    "causal_indirect_effect",
    "fit_function_vector",
    "fit_mean_difference",
    "function_vector",
    "head_outputs",
    "head_scores",
    "mean_head_activations",
    "prompting_baseline",
    "prompting_cost",
    "shuffled_label_batch",
    "top_heads",
]
