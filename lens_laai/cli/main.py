"""``lens-laai``: fit, evaluate and compose interventions from the shell.

    lens-laai fit --task antonym --out runs/antonym            # embedded SmolLM2, layer sweep
    lens-laai eval --task antonym --intervention runs/antonym
    lens-laai compose runs/antonym runs/english-french --out runs/ant_fr --weights 1,1

With ``--json`` the last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from lens_laai.cli.analysis import add_parsers
from lens_laai.cli.args import (
    add_out_args,
    add_task_args,
    finite_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from lens_laai.cli.fit_command import run_fit
from lens_laai.cli.opinion import (
    add_survey_args,
)
from lens_laai.cli.saved import run_compose, run_eval
from lens_laai.cli.study import add_parser as add_study_parser
from lens_laai.errors import LensLaaiError
from lens_laai.fitting.fit import DEFAULT_GROUP_L1_REL, FitConfig


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input prints ``lens-laai CMD: error: ...`` (and ``{"error": ...}`` with --json), exit 2.

    ``argv`` defaults to ``sys.argv[1:]``; the return value is the exit code (0, 2 for bad input, 130 on Ctrl-C).

    Example (prompting alone on a bundled task, then two refusals; the error line itself goes to stderr):
        >>> from lens_laai.cli.main import main
        >>> main(["eval", "--task", "antonym", "--model", "lens-laai-tiny", "--no-progress", "--shots", "0",
        ...       "--n-train", "8", "--json"])
        {"task": "antonym", "accuracy": ..., "n": 356, "shots": 0, "mode": "0-shot prompting", ...}
        0
        >>> main(["eval", "--task", "nope", "--model", "lens-laai-tiny", "--json"])
        {"error": "Unknown task 'nope'. Bundled tasks: antonym, english-french, english-german, synonym; ...", "command": "eval"}
        2
        >>> main(["fit", "--task", "antonym", "--steps", "0", "--out", "x", "--json"])
        {"error": "argument --steps: must be an integer from 1 to 2**63 - 1, got '0'", "command": "fit"}
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except _UsageError as err:  # argparse's own refusals: the usage line, and the JSON line under --json
        err.parser.print_usage(sys.stderr)
        return _fail(argparse.Namespace(command=err.command, json="--json" in argv), err.message, 2)
    original = warnings.formatwarning
    warnings.formatwarning = _format_warning
    started = time.time()
    try:
        return args.func(args)
    except LensLaaiError as err:
        return _fail(args, str(err), 2)
    except KeyboardInterrupt:
        return _fail(args, _interrupted(args, started), 130)
    finally:
        warnings.formatwarning = original


class _UsageError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser, self.message = parser, message
        self.command = parser.prog.removeprefix("lens-laai").strip() or None


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors reach :func:`main` (which adds the ``--json`` line) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


def _interrupted(args: argparse.Namespace, started: float) -> str:
    """What an interrupt left: whether ``--out`` now holds a save this command wrote."""
    from pathlib import Path

    out = getattr(args, "out", None)
    manifest = Path(out) / "manifest.json" if out else None
    try:
        written = manifest is not None and manifest.is_file() and manifest.stat().st_mtime >= started
    except OSError:
        written = False
    if written:
        return f"interrupted after the save was written: {out} holds this run's complete save"
    return "interrupted; nothing was saved" + (f" ({out} is as it was)" if out and Path(out).exists() else "")


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    prefix = f"lens-laai {args.command}" if args.command else "lens-laai"
    print(f"{prefix}: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "command": args.command}))
    return code


def _format_warning(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
    return f"lens-laai: warning: {message}\n"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lens-laai", description="Sparse additive interventions on attention heads.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fit an intervention on a task and report held-out accuracy")
    add_task_args(f)
    add_survey_args(f, fit=True)
    f.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the train/valid/test split")
    f.add_argument(
        "--layer",
        default="auto",
        help="layer index; 'auto' (default: the layer at 53%% of the depth, a rule fixed on our development "
        "study); 'sweep' (the best of --layers by --select); 'joint' (all --layers at once: the group "
        "Lasso picks layers and heads)",
    )
    f.add_argument(
        "--layers",
        default="default",
        help="candidate layers for 'sweep' and 'joint': comma list, 'all', or 'default' (lens_laai.fitting.default_layers)",
    )
    f.add_argument(
        "--n-train", type=positive_int, default=FitConfig.n_train, help="labelled pairs to fit on (default %(default)s)"
    )
    f.add_argument(
        "--n-valid",
        type=nonnegative_int,
        default=FitConfig.n_valid,
        help="extra labelled pairs for --select valid (default 0: the fit uses only --n-train pairs)",
    )
    f.add_argument("--n-test", type=int, default=None, help="cap on test pairs (default: the rest)")
    f.add_argument(
        "--select",
        choices=["cv", "valid", "none", "auto"],
        default=None,
        help="how the head set (the λ₂ path's point) and layer are chosen: 'cv' (default: cross-validation on "
        "the training pairs), 'valid' (on --n-valid extra pairs: the older protocol), 'none' (one layer: "
        "the path's last point); 'auto' is deprecated (valid if --n-valid > 0, else cv with several "
        "layers, else none) and says what it chose",
    )
    f.add_argument(
        "--rule",
        choices=["1se", "min"],
        default=FitConfig.rule,
        help="at one layer: '1se' (default: the sparsest head set whose cross-validated --cv-metric is "
        "within one standard error of the best, and k-shot prompting + Δ unless another --mode auto "
        "candidate is significantly better: a one-sided sign test at 0.05 on the held-out pairs where "
        "they disagree) or 'min' (the best of each: denser heads)",
    )
    f.add_argument(
        "--cv-metric",
        choices=["ce", "accuracy"],
        default=FitConfig.cv_metric,
        help="what --rule reads: held-out cross-entropy (default) or accuracy",
    )
    f.add_argument(
        "--max-heads", type=int, default=None, help="a head budget instead of --rule: at most this many heads"
    )
    f.add_argument(
        "--mode",
        choices=["auto", "zero-shot", "few-shot"],
        default="auto",
        help="how the intervention is used: 'auto' (default: cross-validation on the training pairs chooses "
        "among zero-shot Δ, k-shot prompting, and k-shot prompting + Δ), 'zero-shot' (the paper's setting), "
        "'few-shot' (Δ on k-shot prompts)",
    )
    f.add_argument(
        "--shots",
        default=None,
        help="demonstrations in the training prompts, a comma list (default: 0,5 with --mode auto or few-shot, "
        "fewer when folds are small; 0 with --mode zero-shot)",
    )
    f.add_argument(
        "--last-positions",
        type=positive_int,
        default=1,
        metavar="M",
        help="add Δ at each prompt's last M tokens (default 1: the last token, the paper's setting)",
    )
    f.add_argument(
        "--no-relaxed",
        action="store_true",
        help="keep the penalised Δ (default: refit the chosen heads with the group penalty off)",
    )
    f.add_argument(
        "--stability",
        type=int,
        default=0,
        metavar="N",
        help="also refit on N complementary-pair subsamples (one batched fit) and report each head's "
        "selection probability (default 0: off)",
    )
    f.add_argument(
        "--folds", type=positive_int, default=FitConfig.folds, help="folds for --select cv (default %(default)s)"
    )
    f.add_argument(
        "--no-halving",
        action="store_true",
        help="cross-validate every candidate layer along the whole λ₂ path (default: successive halving)",
    )
    f.add_argument(
        "--init",
        choices=["zero", "mean-difference"],
        default=FitConfig.init,
        help="starting point of the fit (default %(default)s)",
    )
    f.add_argument(
        "--l1", type=finite_float, default=None, help=f"λ₁ (default {FitConfig.l1} for tasks, 1e-4 for surveys)"
    )
    f.add_argument(
        "--group-l1-rel",
        default=None,
        help="λ₂ as fractions of λ_max at each layer, a comma list is a path (default "
        f"{','.join(map(str, DEFAULT_GROUP_L1_REL))}); tasks only",
    )
    f.add_argument(
        "--group-l1",
        default=None,
        help="absolute λ₂ instead of --group-l1-rel (a comma list is a path; surveys: default 0.05,0.01)",
    )
    f.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="proximal steps per λ₂ (default: 30 in all for tasks, 20 for surveys)",
    )
    f.add_argument("--lr", type=positive_float, default=None, help=f"default {FitConfig.lr}")
    f.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip the comparisons with zero-shot and k-shot prompting (k: the fit's k-shot modes, else 5)",
    )
    add_out_args(f)
    f.set_defaults(func=run_fit)

    e = sub.add_parser("eval", help="accuracy of the model, with or without an intervention")
    add_task_args(e)
    add_survey_args(e, fit=False)
    e.add_argument("--intervention", default=None, help="a saved intervention directory")
    e.add_argument(
        "--shots",
        type=nonnegative_int,
        default=None,
        help="demonstrations per prompt, the intervention added (default: the mode the fit chose; 0 without one)",
    )
    e.add_argument("--split", default="test", choices=["train", "valid", "test", "all"])
    e.add_argument(
        "--seed",
        type=nonnegative_int,
        default=None,
        help="split seed (default 0; with --intervention, read from it: a different value is an error)",
    )
    e.add_argument("--n-train", type=nonnegative_int, default=None)
    e.add_argument("--n-valid", type=nonnegative_int, default=None)
    e.add_argument("--strict", action="store_true", help="refuse a model whose weights differ from the fitted one's")
    e.set_defaults(func=run_eval)

    c = sub.add_parser("compose", help="weighted sum of saved interventions")
    c.add_argument("interventions", nargs="+", help="saved intervention directories")
    c.add_argument("--weights", default=None, help="comma list, one per intervention (default: all 1)")
    c.add_argument("--json", action="store_true")
    add_out_args(c)
    c.set_defaults(func=run_compose)

    add_parsers(sub, add_task_args)
    add_study_parser(sub)
    return p


if __name__ == "__main__":
    raise SystemExit(main())
