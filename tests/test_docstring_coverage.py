"""Every public function and class comes with a docstring example (tests/test_docstrings.py runs them).

The names below still lack one. The list may only shrink: a new public name without an example fails,
and so does a listed name that has gained one (delete it from the list). Print the current list with
``python tests/test_docstring_coverage.py``; ``--write`` puts it in this file (after a merge).
"""

import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import lens_laai

LISTED = """
lens_laai.cli.analysis.add_parsers
lens_laai.cli.analysis.analysis_prompt
lens_laai.cli.analysis.run_analyze
lens_laai.cli.analysis.run_report
lens_laai.cli.args.add_out_args
lens_laai.cli.args.add_task_args
lens_laai.cli.args.finite_float
lens_laai.cli.args.model_from_args
lens_laai.cli.args.nonempty_text
lens_laai.cli.args.nonnegative_int
lens_laai.cli.args.parse_float
lens_laai.cli.args.parse_int_list
lens_laai.cli.args.parse_penalties
lens_laai.cli.args.positive_float
lens_laai.cli.args.positive_int
lens_laai.cli.args.task_from_args
lens_laai.cli.fit_command.run_fit
lens_laai.cli.fit_report.print_frontier
lens_laai.cli.fit_report.print_stability
lens_laai.cli.main.main
lens_laai.cli.opinion.add_survey_args
lens_laai.cli.opinion.eval_survey
lens_laai.cli.opinion.fill_task_defaults
lens_laai.cli.opinion.fit_survey
lens_laai.cli.opinion.is_survey
lens_laai.cli.saved.run_compose
lens_laai.cli.saved.run_eval
lens_laai.cli.study.add_parser
lens_laai.cli.study.run_command
lens_laai.cli.study.status_command
lens_laai.evaluation.evaluate.resolve_template
lens_laai.evaluation.evaluate.select_split
lens_laai.fastpath.cost.CostMeter
lens_laai.fitting.config.FitConfig
lens_laai.fitting.config.FitResult
lens_laai.fitting.config.auto_layer
lens_laai.fitting.config.default_layers
lens_laai.fitting.config.parse_layers
lens_laai.fitting.config.prepare_data
lens_laai.fitting.fit.fit
lens_laai.fitting.fit.fit_path
lens_laai.fitting.frontier.PathChoice
lens_laai.fitting.frontier.choose_on_path
lens_laai.fitting.frontier.frontier
lens_laai.fitting.frontier.plot_frontier
lens_laai.fitting.layer_fit.LayerFit
lens_laai.fitting.layer_fit.delta_hooks
lens_laai.fitting.layer_fit.initial_delta
lens_laai.fitting.layer_fit.lambda_max
lens_laai.fitting.layer_fit.layer_path
lens_laai.fitting.layer_fit.objective
lens_laai.fitting.layer_fit.sites_of
lens_laai.fitting.layer_fit.solve_layer
lens_laai.fitting.layer_fit.training_batches
lens_laai.fitting.penalties.lambda_values
lens_laai.fitting.relaxed.PathPoint
lens_laai.fitting.relaxed.pair_scores
lens_laai.fitting.relaxed.relaxed_path
lens_laai.fitting.relaxed.relaxed_refit
lens_laai.fitting.relaxed.support
lens_laai.fitting.selection.choose
lens_laai.fitting.selection.choose_point
lens_laai.fitting.selection.cross_validate
lens_laai.fitting.selection.cross_validated_path
lens_laai.fitting.selection.pooled_cv_scores
lens_laai.fitting.selection.score_table
lens_laai.fitting.solver.StepRecord
lens_laai.fitting.solver.penalty
lens_laai.fitting.solver.prox_sparse_group_lasso
lens_laai.fitting.stability.Stability
lens_laai.fitting.stability.complementary_pairs
lens_laai.fitting.stability.stability
lens_laai.interventions.head.delta_hook
lens_laai.tasks.prompts.iter_batches
lens_laai.tasks.prompts.make_batch
lens_laai.tasks.prompts.pad_id
"""
WITHOUT_EXAMPLE = set(LISTED.split())


def names_without_example() -> set[str]:
    """Public module-level functions and classes of lens_laai, defined where found, with no ``>>>`` in their docstring."""
    missing = set()
    for info in pkgutil.walk_packages(lens_laai.__path__, "lens_laai."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name:
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and ">>>" not in (inspect.getdoc(obj) or ""):
                missing.add(f"{info.name}.{name}")
    return missing


def test_new_public_names_come_with_an_example():
    new = sorted(names_without_example() - WITHOUT_EXAMPLE)
    assert not new, f"public names without a docstring example (add an 'Example:' section with >>> lines): {new}"


def test_the_allow_list_only_shrinks():
    stale = sorted(WITHOUT_EXAMPLE - names_without_example())
    assert not stale, f"these names have an example now or are gone; delete them from LISTED: {stale}"


if __name__ == "__main__":
    missing = sorted(names_without_example())
    print(len(missing), "public module-level functions and classes without an example:")
    print("\n".join(missing))
    if "--write" in sys.argv[1:]:
        here = Path(__file__)
        listed = "".join(f"{name}\n" for name in missing)
        text = re.sub(
            r'(LISTED = """\n).*?(""")', lambda m: m[1] + listed + m[2], here.read_text(), count=1, flags=re.S
        )
        here.write_text(text)
