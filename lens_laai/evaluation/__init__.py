"""Evaluation and generation with any intervention: accuracy, per-example tables, text.

Every number called accuracy is :func:`lens_laai.fastpath.score_logits`' top-1 accuracy of the
target's first token at the last prompt position, on a split the intervention did not see.
"""

from lens_laai.evaluation.evaluate import EvalResult, evaluate_many
from lens_laai.evaluation.generation import generate

__all__ = ["EvalResult", "evaluate_many", "generate"]

# ``evaluate`` itself is ``lens_laai.evaluate``: exported here it would hide the module lens_laai.evaluation.evaluate.
