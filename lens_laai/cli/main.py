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
from typing import Any

import pandas as pd

from lens_laai.cli.analysis import add_parsers
from lens_laai.cli.args import (
    add_out_args,
    add_task_args,
    model_from_args,
    parse_float,
    parse_int,
    parse_penalties,
    task_from_args,
)
from lens_laai.cli.fit_report import print_frontier, print_stability
from lens_laai.cli.opinion import (
    add_survey_args,
    eval_survey,
    fill_task_defaults,
    fit_survey,
    is_survey,
)
from lens_laai.errors import FitError, LensLaaiError
from lens_laai.fitting.fit import DEFAULT_GROUP_L1_REL, FitConfig


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input prints ``lens-laai CMD: error: ...`` (and ``{"error": ...}`` with --json), exit 2."""
    args = _parser().parse_args(argv)
    original = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return args.func(args)
    except LensLaaiError as err:
        return _fail(args, str(err), 2)
    except KeyboardInterrupt:
        return _fail(args, "interrupted; nothing was saved", 130)
    finally:
        warnings.formatwarning = original


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"lens-laai {args.command}: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "command": args.command}))
    return code


def _format_warning(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
    return f"lens-laai: warning: {message}\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lens-laai", description="Sparse additive interventions on attention heads.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fit an intervention on a task and report held-out accuracy")
    add_task_args(f)
    add_survey_args(f, fit=True)
    f.add_argument("--seed", type=int, default=0, help="seed of the train/valid/test split")
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
        help="candidate layers for 'sweep' and 'joint': comma list, 'all', or 'default' (lens_laai.default_layers)",
    )
    f.add_argument(
        "--n-train", type=int, default=FitConfig.n_train, help="labelled pairs to fit on (default %(default)s)"
    )
    f.add_argument(
        "--n-valid",
        type=int,
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
        "within one standard error of the best) or 'min' (the best: denser, more accurate)",
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
    f.add_argument("--folds", type=int, default=FitConfig.folds, help="folds for --select cv (default %(default)s)")
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
    f.add_argument("--l1", type=float, default=None, help=f"λ₁ (default {FitConfig.l1} for tasks, 1e-4 for surveys)")
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
        "--steps", type=int, default=None, help="proximal steps per λ₂ (default: 30 in all for tasks, 20 for surveys)"
    )
    f.add_argument("--lr", type=float, default=None, help=f"default {FitConfig.lr}")
    f.add_argument("--no-baselines", action="store_true", help="skip the zero-shot and 5-shot comparisons")
    add_out_args(f)
    f.set_defaults(func=_fit)

    e = sub.add_parser("eval", help="accuracy of the model, with or without an intervention")
    add_task_args(e)
    add_survey_args(e, fit=False)
    e.add_argument("--intervention", default=None, help="a saved intervention directory")
    e.add_argument("--shots", type=int, default=0)
    e.add_argument("--split", default="test", choices=["train", "valid", "test", "all"])
    e.add_argument(
        "--seed",
        type=int,
        default=None,
        help="split seed (default 0; with --intervention, read from it: a different value is an error)",
    )
    e.add_argument("--n-train", type=int, default=None)
    e.add_argument("--n-valid", type=int, default=None)
    e.add_argument("--strict", action="store_true", help="refuse a model whose weights differ from the fitted one's")
    e.set_defaults(func=_eval)

    c = sub.add_parser("compose", help="weighted sum of saved interventions")
    c.add_argument("interventions", nargs="+", help="saved intervention directories")
    c.add_argument("--weights", default=None, help="comma list, one per intervention (default: all 1)")
    c.add_argument("--json", action="store_true")
    add_out_args(c)
    c.set_defaults(func=_compose)

    add_parsers(sub, add_task_args)
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
    args.select = args.select or "cv"
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
    group_l1_rel = parse_penalties(args.group_l1_rel, "--group-l1-rel")
    if args.layers not in ("default", "all"):
        parse_layers(args.layers, 1 << 30)  # the syntax now; the range once the model is loaded
    if args.select == "valid" and not args.n_valid:
        raise FitError(
            "--select valid chooses on a validation split; give --n-valid N (extra labelled pairs) or --select cv."
        )
    cross_validates = args.select == "cv" or (args.select == "auto" and not args.n_valid)
    if args.max_heads is not None and (args.max_heads < 1 or layer in ("sweep", "joint")):
        raise FitError("--max-heads is a head budget (an integer ≥ 1) on one layer; not with --layer sweep or joint.")
    if args.stability and (args.stability < 2 or args.stability % 2):
        raise FitError(
            f"--stability takes an even number of subsamples ≥ 2 (complementary pairs), got {args.stability}."
        )
    if cross_validates and not 2 <= args.folds <= args.n_train:
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
        rule=args.rule,
        cv_metric=args.cv_metric,
        relaxed=not args.no_relaxed,
        max_heads=args.max_heads,
        folds=args.folds,
        halving=not args.no_halving,
        progress=not args.no_progress,
    )
    test = evaluate(model, splits, result.intervention, progress=not args.no_progress)
    stable = _stability(model, splits, result, args) if args.stability else None
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
        "selection_rule": result.selection_rule,
        "relaxed": result.relaxed,
        "n_selected": result.n_selected,
        "penalised_n_selected": len(result.penalised.selected_heads()) if result.penalised else None,
        "labelled_pairs_used": len(splits.train) + (len(splits.valid) if result.selection == "valid" else 0),
        "selected_heads": [list(h) for h in result.selected_heads],
        "n_heads_total": model.cfg.n_heads,
        "train_accuracy": result.train_accuracy,
        "penalised_train_accuracy": result.penalised_train_accuracy,
        "cv_accuracy": result.cv_accuracy,
        "cv_accuracy_se": result.cv_accuracy_se,
        "validation_accuracy": result.valid_accuracy if len(splits.valid) else None,
        "valid_accuracy": _deprecated_valid_accuracy(result, splits),
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
    if stable is not None:
        summary["stability"] = stable
    if not args.json or not args.no_progress:
        _print_fit_table(summary, result.candidates)
    if args.json:
        print(json.dumps(summary))
    return 0


def _deprecated_valid_accuracy(result: Any, splits: Any) -> float:
    """The old ``valid_accuracy`` key: the score the choice was made on, or the training accuracy (removed next release)."""
    if result.cv_accuracy is not None:
        return result.cv_accuracy
    return result.valid_accuracy if len(splits.valid) else result.train_accuracy


def _stability(model: Any, splits: Any, result: Any, args: argparse.Namespace) -> dict[str, Any]:
    from lens_laai.fitting.stability import stability

    lam = result.config.group_l1 if result.config.relative else None  # Λ: down to the λ₂ the fit chose
    st = stability(
        model, splits, layer=result.layer, n_subsamples=args.stability, lam=lam, progress=not args.no_progress
    )
    return st.summary(result.selected_heads)


def _print_fit_table(s: dict[str, Any], sweep: pd.DataFrame) -> None:
    heads = ", ".join(f"L{l}H{h}" for l, h in s["selected_heads"]) or "none"
    parts = s["selection_rule"].split("-")
    if parts[0] == "cv" and len(parts) == 3:
        metric = "cross-entropy" if parts[2] == "ce" else "accuracy"
        rule = f"cross-validated {metric}, " + ("best" if parts[1] == "min" else "one-standard-error rule")
    else:
        rule = s["selection_rule"]
    print(
        f"\nTask {s['task']} on {s['model']}: layer {s['layer']}, {len(s['selected_heads'])} of "
        f"{s['n_heads_total']} heads selected ({heads}); {rule}"
        + ("; relaxed refit (group penalty off on those heads)" if s["relaxed"] else "")
    )
    if "group_l1_rel" in sweep and "chosen" in sweep and len(sweep) > 1:
        print_frontier(s, sweep)
    elif len(sweep) > 1:
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
    if "stability" in s:
        print_stability(s["stability"])
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
