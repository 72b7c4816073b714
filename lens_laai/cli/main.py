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

import pandas as pd

from lens_laai.cli.analysis import add_parsers
from lens_laai.cli.args import (
    add_out_args,
    add_task_args,
    finite_float,
    model_from_args,
    nonnegative_int,
    parse_float,
    parse_int,
    parse_int_list,
    parse_penalties,
    positive_float,
    positive_int,
    task_from_args,
)
from lens_laai.cli.opinion import (
    add_survey_args,
    eval_survey,
    fill_task_defaults,
    fit_survey,
    is_survey,
)
from lens_laai.cli.study import add_parser as add_study_parser
from lens_laai.errors import FitError, LensLaaiError
from lens_laai.fitting.fit import DEFAULT_GROUP_L1_REL, FitConfig


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input prints ``lens-laai CMD: error: ...`` (and ``{"error": ...}`` with --json), exit 2."""
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
        choices=["auto", "cv", "valid"],
        default="auto",
        help="how layer and λ₂ are chosen: 'cv' (cross-validation on the training pairs), 'valid' (on "
        "--n-valid extra pairs: the older protocol), 'auto' (valid if --n-valid > 0, else cv when "
        "there is a choice to make; a single layer's λ₂ path ends at its last value)",
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
    f.add_argument("--no-baselines", action="store_true", help="skip the zero-shot and 5-shot comparisons")
    add_out_args(f)
    f.set_defaults(func=_fit)

    e = sub.add_parser("eval", help="accuracy of the model, with or without an intervention")
    add_task_args(e)
    add_survey_args(e, fit=False)
    e.add_argument("--intervention", default=None, help="a saved intervention directory")
    e.add_argument("--shots", type=nonnegative_int, default=0)
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
    e.set_defaults(func=_eval)

    c = sub.add_parser("compose", help="weighted sum of saved interventions")
    c.add_argument("interventions", nargs="+", help="saved intervention directories")
    c.add_argument("--weights", default=None, help="comma list, one per intervention (default: all 1)")
    c.add_argument("--json", action="store_true")
    add_out_args(c)
    c.set_defaults(func=_compose)

    add_parsers(sub, add_task_args)
    add_study_parser(sub)
    return p


def _fit(args: argparse.Namespace) -> int:
    from lens_laai.baselines.common import check_shots
    from lens_laai.evaluation.evaluate import evaluate
    from lens_laai.fitting.fit import fit, parse_layers
    from lens_laai.models.loading import check_placement
    from lens_laai.storage.bundle import check_save_path

    check_placement(args.device, args.dtype)  # a bad --device / --dtype is refused before any work
    if is_survey(args):
        return fit_survey(args)
    fill_task_defaults(args)
    start = time.perf_counter()
    task = task_from_args(args)
    layer: int | str = (
        args.layer
        if args.layer in ("auto", "joint", "sweep")
        else parse_int(args.layer, "--layer", "'auto', 'sweep' or 'joint'")
    )
    if args.group_l1 is not None and args.group_l1_rel is not None:
        raise FitError("give --group-l1 (absolute λ₂) or --group-l1-rel (fractions of λ_max), not both.")
    group_l1 = parse_penalties(args.group_l1, "--group-l1")
    group_l1_rel = parse_penalties(args.group_l1_rel, "--group-l1-rel", at_most=1.0)
    if args.layers not in ("default", "all"):
        parse_layers(parse_int_list(args.layers, "--layers"), 1 << 30)  # the syntax now; the range once loaded
    if args.select == "valid" and not args.n_valid:
        raise FitError(
            "--select valid chooses on a validation split; give --n-valid N (extra labelled pairs) or --select cv."
        )
    cross_validates = args.select == "cv" or (args.select == "auto" and not args.n_valid)
    if layer in ("sweep", "joint") and cross_validates and not 2 <= args.folds <= args.n_train:
        raise FitError(f"--folds must be within 2..--n-train ({args.n_train}), got {args.folds}.")
    if layer == "auto" and args.layers != "default":
        raise FitError(
            "--layers lists candidates for --layer sweep or --layer joint; --layer auto fits the layer at "
            "53% of the depth."
        )
    splits = task.split(args.seed, args.n_train, args.n_valid, args.n_test)
    if not args.no_baselines:
        check_shots(splits, 5, "test")
    check_save_path(args.out, force=args.force)
    model = model_from_args(args)
    layers = None if args.layers == "default" else parse_layers(args.layers, model.cfg.n_layers)
    result = fit(
        model,
        splits,
        layer,
        layers=layers,
        l1=args.l1,
        group_l1=group_l1,
        group_l1_rel=group_l1_rel,
        steps=args.steps,
        lr=args.lr,
        init=args.init,
        select=args.select,
        folds=args.folds,
        halving=not args.no_halving,
        progress=not args.no_progress,
    )
    if not result.intervention.selected_heads():
        warnings.warn(
            "the fit switched every head off (Δ is all zero), so the saved intervention does nothing; "
            "lower --lr or the penalties (--group-l1 / --group-l1-rel, --l1).",
            stacklevel=1,
        )
    test = evaluate(model, splits, result.intervention, progress=not args.no_progress)
    zero = few = None
    if not args.no_baselines:
        zero = evaluate(model, splits, shots=0, progress=not args.no_progress).accuracy
        few = evaluate(model, splits, shots=5, progress=not args.no_progress).accuracy
    result.intervention.save(args.out, force=args.force)
    summary = {
        "task": task.name,
        "model": args.model,
        "device": str(model.cfg.device),
        "dtype": str(model.cfg.dtype).removeprefix("torch."),
        "layer": result.layer,
        "group_l1": result.config.group_l1,
        "relative": result.config.relative,
        "selection": result.selection,
        "labelled_pairs_used": len(splits.train) + (len(splits.valid) if result.selection == "valid" else 0),
        "selected_heads": [list(h) for h in result.selected_heads],
        "n_heads_total": model.cfg.n_heads,
        "train_accuracy": result.train_accuracy,
        "valid_accuracy": result.valid_accuracy,
        "test_accuracy": test.accuracy,
        "n_test": test.n,
        "zero_shot_accuracy": zero,
        "few_shot_accuracy": few,
        "fit_seconds": round(result.seconds, 2),
        "forward_equivalents": round(result.forward_equivalents, 1),
        "fast_path": result.fast_path,
        "out": str(args.out),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if not args.json or not args.no_progress:
        _print_fit_table(summary, result.sweep)
    if args.json:
        print(json.dumps(summary))
    return 0


def _print_fit_table(s: dict[str, Any], sweep: pd.DataFrame) -> None:
    heads = ", ".join(f"L{l}H{h}" for l, h in s["selected_heads"]) or "none"
    print(
        f"\nTask {s['task']} on {s['model']}: layer {s['layer']}, {len(s['selected_heads'])} of "
        f"{s['n_heads_total']} heads selected ({heads})"
    )
    if len(sweep) > 1:
        used = f"{s['labelled_pairs_used']} labelled pairs used in all"
        if s["selection"] == "none":
            print(f"\nλ₂ path at layer {s['layer']} (warm starts; its last value is the fit; {used}):")
            sweep = sweep.drop(columns=[c for c in ("valid_accuracy", "valid_ce") if c in sweep])
        elif s["selection"] == "cv":
            print(f"\nCandidates, scored by cross-validation on the training pairs ({used}):")
        else:
            print(f"\nCandidates, scored on the validation split ({used}):")
        print(sweep.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    rows = [
        ("zero-shot prompt", s["zero_shot_accuracy"]),
        ("5-shot prompt", s["few_shot_accuracy"]),
        ("LAAI intervention (0-shot)", s["test_accuracy"]),
    ]
    table = pd.DataFrame(
        [(m, a) for m, a in rows if a is not None], columns=["method", f"test accuracy (n={s['n_test']})"]
    )
    print("\n" + table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(
        f"\nfit {s['fit_seconds']:.1f}s ({s['forward_equivalents']:.0f} forward-pass equivalents), "
        f"total {s['seconds']:.1f}s; saved to {s['out']}"
    )


def _eval(args: argparse.Namespace) -> int:
    from lens_laai.evaluation.evaluate import evaluate
    from lens_laai.interventions.protocol import load_intervention

    if is_survey(args):
        return eval_survey(args)
    task = task_from_args(args)
    if args.intervention is None and args.strict:
        raise LensLaaiError("--strict checks an intervention against the model; give --intervention too.")
    model = model_from_args(args)
    iv = load_intervention(args.intervention, model, strict=args.strict) if args.intervention else None
    _check_provenance(iv, args)
    result = evaluate(
        model,
        task,
        iv,
        shots=args.shots,
        split=args.split,
        seed=args.seed,
        n_train=args.n_train,
        n_valid=args.n_valid,
        progress=not args.no_progress,
    )
    out = {
        "task": task.name,
        "accuracy": result.accuracy,
        "n": result.n,
        "shots": args.shots,
        "intervention": args.intervention,
        "split": args.split,
        "seconds": round(result.seconds, 2),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(result.table[["input", "target", "prediction", "correct"]].head(10).to_string(index=False))
        print(f"\naccuracy {result.accuracy:.3f} on {result.n} {args.split} examples")
    return 0


def _check_provenance(iv: Any, args: argparse.Namespace) -> None:
    """Refuse a task evaluation that cannot keep the fit's training pairs out of the scored split.

    A survey intervention's record splits questions, not task pairs; an intervention whose data
    record and fit_config are gone (deleted, or never written) cannot say which pairs it saw, so
    only an explicit ``--split all`` (scoring every pair, knowingly) is allowed.
    """
    from lens_laai.interventions.ablation import HeadAblation

    if iv is None or isinstance(iv, HeadAblation):
        return
    if "survey" in iv.metadata or iv.metadata.get("kind") == "opinion":
        raise LensLaaiError(
            f"{args.intervention} was fitted on a survey ({iv.metadata.get('name', '?')}); its record splits survey "
            "questions, not task pairs. Evaluate it with --survey / --survey-dir instead of --task."
        )
    config = iv.metadata.get("fit_config")
    if not iv.metadata.get("data") and not (isinstance(config, dict) and "seed" in config):
        if args.split != "all":
            raise LensLaaiError(
                f"{args.intervention} records neither the data it was fitted on (metadata.data) nor its fit_config, "
                "so its held-out split cannot be checked and training pairs could be scored as test. Pass "
                "--split all to score every pair knowingly."
            )
        warnings.warn(
            f"{args.intervention} has no data record: --split all scores pairs it may have been fitted on.",
            stacklevel=1,
        )


def _compose(args: argparse.Namespace) -> int:
    from lens_laai.interventions.protocol import load_intervention
    from lens_laai.storage.bundle import check_save_path

    weights = (
        [1.0] * len(args.interventions)
        if args.weights is None
        else [parse_float(w, "--weights") for w in args.weights.split(",")]
    )
    if len(weights) != len(args.interventions):
        raise LensLaaiError(
            f"--weights has {len(weights)} values for {len(args.interventions)} interventions; give one each."
        )
    check_save_path(args.out, force=args.force)
    ivs = [load_intervention(p) for p in args.interventions]
    total = weights[0] * ivs[0]
    for w, iv in zip(weights[1:], ivs[1:]):
        total = total + w * iv
    total.metadata.update(composed_from=list(args.interventions), weights=weights)
    total.save(args.out, force=args.force)
    heads = [list(h) for h in total.selected_heads()] if hasattr(total, "selected_heads") else []
    out = {"out": args.out, "layers": total.layers, "selected_heads": heads}
    print(json.dumps(out) if args.json else f"saved {args.out}: layers {total.layers}, {len(heads)} heads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
