"""Evaluation and generation with any intervention: accuracy, per-example tables, text."""
