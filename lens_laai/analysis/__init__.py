"""Which heads carry the task: the head table, per-head effects, summaries, views and the offline report."""
