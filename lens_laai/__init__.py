"""lens_laai: sparse, task-driven additive interventions on attention heads for TransformerLens.

Implements Task-driven Layerwise Additive Activation Intervention (Nguyen et al., NAACL 2025):
a learned Δ ∈ R^{n_heads × d_head} added to ``blocks.L.attn.hook_z`` at the last prompt token,
fitted on a few examples with a sparse-group-lasso penalty so that whole heads switch off.

The top level holds what a notebook calls: load a model and a task, :func:`~lens_laai.fit`, :func:`~lens_laai.evaluate`
or :func:`generate` with the intervention, :func:`~lens_laai.head_table` to see which heads carry the task,
and the survey entry points. Settings and policy helpers (``FitConfig``, ``default_layers``,
``auto_layer``) live in :mod:`lens_laai.fitting`; the fast path in :mod:`lens_laai.fastpath`;
the baselines in :mod:`lens_laai.baselines`.
"""

from lens_laai.analysis.head_table import HeadAnalysis, head_table
from lens_laai.errors import (
    FitError,
    InterventionError,
    LensLaaiError,
    ModelError,
    SaveError,
    TaskError,
)
from lens_laai.evaluation.evaluate import EvalResult, evaluate, evaluate_many
from lens_laai.evaluation.generation import generate
from lens_laai.fitting.fit import FitResult, fit, fit_path
from lens_laai.interventions.ablation import HeadAblation
from lens_laai.interventions.head import HeadIntervention
from lens_laai.interventions.protocol import Intervention, load_intervention
from lens_laai.interventions.residual import ResidualIntervention
from lens_laai.models.loading import load_model
from lens_laai.opinions.evaluate import OpinionEval, compare_methods, evaluate_opinion
from lens_laai.opinions.fit import OpinionFitResult, fit_opinion
from lens_laai.opinions.loading import bundled_surveys, load_survey
from lens_laai.opinions.survey import Survey, SurveySplits
from lens_laai.tasks.prompts import PromptTemplate
from lens_laai.tasks.task import (
    Task,
    TaskSplits,
    bundled_tasks,
    compose_tasks,
    load_task,
)
from lens_laai.version import __version__

__all__ = [
    "EvalResult",
    "FitError",
    "FitResult",
    "HeadAblation",
    "HeadAnalysis",
    "HeadIntervention",
    "Intervention",
    "InterventionError",
    "LensLaaiError",
    "ModelError",
    "OpinionEval",
    "OpinionFitResult",
    "PromptTemplate",
    "ResidualIntervention",
    "SaveError",
    "Survey",
    "SurveySplits",
    "Task",
    "TaskError",
    "TaskSplits",
    "__version__",
    "bundled_surveys",
    "bundled_tasks",
    "compare_methods",
    "compose_tasks",
    "evaluate",
    "evaluate_many",
    "evaluate_opinion",
    "fit",
    "fit_opinion",
    "fit_path",
    "generate",
    "head_table",
    "load_intervention",
    "load_model",
    "load_survey",
    "load_task",
]
