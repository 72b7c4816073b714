"""lens_laai: sparse, task-driven additive interventions on attention heads for TransformerLens.

Implements Task-driven Layerwise Additive Activation Intervention (Nguyen et al., NAACL 2025):
a learned Δ ∈ R^{n_heads × d_head} added to ``blocks.L.attn.hook_z`` at the last prompt token,
fitted on a few examples with a sparse-group-lasso penalty so that whole heads switch off.
"""

from lens_laai.errors import (
    FitError,
    InterventionError,
    LensLaaiError,
    ModelError,
    SaveError,
    TaskError,
)
from lens_laai.evaluation.evaluate import EvalResult, evaluate, evaluate_many, generate
from lens_laai.fitting.fit import (
    FitConfig,
    FitResult,
    auto_layer,
    default_layers,
    fit,
    fit_path,
)
from lens_laai.interventions.ablation import HeadAblation
from lens_laai.interventions.head import HeadIntervention
from lens_laai.interventions.protocol import Intervention, load_intervention
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
    "FitConfig",
    "HeadAblation",
    "FitError",
    "FitResult",
    "HeadIntervention",
    "Intervention",
    "InterventionError",
    "LensLaaiError",
    "ModelError",
    "PromptTemplate",
    "SaveError",
    "Task",
    "TaskError",
    "TaskSplits",
    "__version__",
    "auto_layer",
    "bundled_tasks",
    "compose_tasks",
    "default_layers",
    "evaluate",
    "evaluate_many",
    "fit",
    "fit_path",
    "generate",
    "load_intervention",
    "load_model",
    "load_task",
    "OpinionEval",
    "OpinionFitResult",
    "Survey",
    "SurveySplits",
    "bundled_surveys",
    "compare_methods",
    "evaluate_opinion",
    "fit_opinion",
    "load_survey",
]
