"""lens_laai: sparse, task-driven additive interventions on attention heads for TransformerLens.

Implements Task-driven Layerwise Additive Activation Intervention (Nguyen et al., NAACL 2025):
a learned Δ ∈ R^{n_heads × d_head} added to ``blocks.L.attn.hook_z`` at the last prompt token,
fitted on a few examples with a sparse-group-lasso penalty so that whole heads switch off.
"""

__version__ = "0.1.0"

from .ablation import HeadAblation
from .errors import FitError, InterventionError, LensLaaiError, ModelError, SaveError, TaskError
from .evaluate import EvalResult, evaluate, evaluate_many, generate
from .fit import FitConfig, FitResult, auto_layer, default_layers, fit, fit_path
from .intervention import HeadIntervention
from .models import load_model
from .opinion import OpinionFitResult, fit_opinion
from .opinion_eval import OpinionEval, compare_methods, evaluate_opinion
from .prompts import PromptTemplate
from .protocol import Intervention, load_intervention
from .survey import Survey, SurveySplits, bundled_surveys, load_survey
from .tasks import Task, TaskSplits, bundled_tasks, compose_tasks, load_task

__all__ = [
    "EvalResult", "FitConfig", "HeadAblation", "FitError", "FitResult", "HeadIntervention", "Intervention", "InterventionError",
    "LensLaaiError", "ModelError", "PromptTemplate", "SaveError", "Task", "TaskError", "TaskSplits", "__version__",
    "auto_layer", "bundled_tasks", "compose_tasks", "default_layers", "evaluate", "evaluate_many", "fit", "fit_path", "generate",
    "load_intervention", "load_model", "load_task",
    "OpinionEval", "OpinionFitResult", "Survey", "SurveySplits", "bundled_surveys", "compare_methods", "evaluate_opinion",
    "fit_opinion", "load_survey",
]
