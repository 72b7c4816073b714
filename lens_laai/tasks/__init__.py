"""Task data, prompts and padded batches, and the record of which pairs a fit saw.

* :mod:`~lens_laai.tasks.task`: :class:`Task` (input → target pairs), seeded :class:`TaskSplits`,
  the bundled tasks, :func:`compose_tasks`;
* :mod:`~lens_laai.tasks.prompts`: :class:`PromptTemplate`, k-shot prompts and left-padded :class:`Batch`\\ es;
* :mod:`~lens_laai.tasks.provenance`: hashes of the pairs a fit used, so evaluation can refuse seen ones.
"""

from lens_laai.tasks.prompts import Batch, PromptTemplate, k_shot_prompts, make_batch
from lens_laai.tasks.task import Task, TaskSplits, bundled_tasks, compose_tasks, load_task

__all__ = [
    "Batch",
    "PromptTemplate",
    "Task",
    "TaskSplits",
    "bundled_tasks",
    "compose_tasks",
    "k_shot_prompts",
    "load_task",
    "make_batch",
]
