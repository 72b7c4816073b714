"""Which heads carry the task: the head table, per-head effects, summaries, views and the offline report.

* :mod:`~lens_laai.analysis.head_table`: :func:`~lens_laai.head_table` → :class:`HeadAnalysis`, one row per head
  with ‖Δ_h‖ beside attribution, patching and ablation scores, and how well they agree;
* :mod:`~lens_laai.analysis.logit_attribution`, :mod:`~lens_laai.analysis.patching`,
  :mod:`~lens_laai.analysis.effects`: each per-head score as an ``[n_layers, n_heads]`` tensor (direct logit
  attribution and the logit lens; activation and attribution patching; ablation and necessity);
* :mod:`~lens_laai.analysis.views`, :mod:`~lens_laai.analysis.report`: figures, circuitsvis views
  and the offline HTML report.
"""

from lens_laai.analysis.head_table import HeadAnalysis

__all__ = ["HeadAnalysis"]

# ``head_table`` itself is ``lens_laai.head_table``: exported here it would hide the module lens_laai.analysis.head_table.
