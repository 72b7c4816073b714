"""Opinion tasks: surveys and their loaders, prompts, divergences, the survey fit and its evaluation.

* :mod:`~lens_laai.opinions.survey`: :class:`Survey` (questions, groups' answer distributions), splits;
* :mod:`~lens_laai.opinions.loading`, :mod:`~lens_laai.opinions.opinionqa`: bundled surveys, OpinionQA files;
* :mod:`~lens_laai.opinions.prompts`: multiple-choice prompts and the answer-letter distribution;
* :mod:`~lens_laai.opinions.metrics`: KL, JS, W₁ and OpinionQA's representativeness;
* :mod:`~lens_laai.opinions.fit`, :mod:`~lens_laai.opinions.evaluate`: :func:`fit_opinion`,
  :func:`evaluate_opinion`, :func:`compare_methods`.
"""

from lens_laai.opinions.evaluate import OpinionEval, compare_methods, evaluate_opinion
from lens_laai.opinions.fit import OpinionFitResult, fit_opinion
from lens_laai.opinions.loading import bundled_surveys, load_survey
from lens_laai.opinions.metrics import mean_metrics
from lens_laai.opinions.opinionqa import load_opinionqa
from lens_laai.opinions.prompts import OpinionPrompt
from lens_laai.opinions.survey import Survey, SurveySplits

__all__ = [
    "OpinionEval",
    "OpinionFitResult",
    "OpinionPrompt",
    "Survey",
    "SurveySplits",
    "bundled_surveys",
    "compare_methods",
    "evaluate_opinion",
    "fit_opinion",
    "load_opinionqa",
    "load_survey",
    "mean_metrics",
]
