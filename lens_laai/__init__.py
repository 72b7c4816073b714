"""lens_laai: sparse, task-driven additive interventions on attention heads for TransformerLens.

Implements Task-driven Layerwise Additive Activation Intervention (Nguyen et al., NAACL 2025):
a learned Δ ∈ R^{n_heads × d_head} added to ``blocks.L.attn.hook_z`` at the last prompt token,
fitted on a few examples with a sparse-group-lasso penalty so that whole heads switch off.
"""

__version__ = "0.1.0"

from .evaluate import EvalResult, evaluate, evaluate_many, generate
from .fit import FitConfig, FitResult, fit, fit_path
from .intervention import HeadIntervention, InterventionError
from .models import load_model
from .prompts import PromptTemplate
from .tasks import Task, TaskError, TaskSplits, bundled_tasks, compose_tasks, load_task

__all__ = [
    "EvalResult", "FitConfig", "FitResult", "HeadIntervention", "InterventionError", "PromptTemplate",
    "Task", "TaskError", "TaskSplits", "__version__", "bundled_tasks", "compose_tasks", "evaluate", "evaluate_many",
    "fit", "fit_path", "generate", "load_model", "load_task",
]
