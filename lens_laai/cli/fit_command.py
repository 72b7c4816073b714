"""``lens-laai fit`` on a task: check every option before the model loads, fit, score against prompting, save."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import pandas as pd

from lens_laai.cli.args import (
    model_from_args,
    parse_int,
    parse_int_list,
    parse_penalties,
    task_from_args,
)
from lens_laai.cli.fit_report import print_frontier, print_modes, print_stability, where
from lens_laai.cli.opinion import (
    fill_task_defaults,
    fit_survey,
    is_survey,
)
from lens_laai.errors import FitError


def run_fit(args: argparse.Namespace) -> int:
    """``lens-laai fit`` on a task: check every option before the model loads, fit, score on the test split, save.

    Prints the fit's table (the frontier, the modes, test accuracy against prompting) and, with ``--json``,
    ends with one JSON line; returns the exit code.

    Example (one proximal step at layer 1 of the tiny model, on 8 labelled pairs):
        >>> import contextlib, io, json, os, shutil, tempfile
        >>> from lens_laai.cli.main import main
        >>> from lens_laai.testing import tiny_task
        >>> folder = tempfile.mkdtemp()
        >>> tiny_task().to_json(os.path.join(folder, "tiny.json"))
        >>> tiny = ["--task-file", os.path.join(folder, "tiny.json"), "--model", "lens-laai-tiny", "--no-progress"]
        >>> fit = ["fit", *tiny, "--layer", "1", "--n-train", "8", "--steps", "1", "--mode", "zero-shot",
        ...        "--select", "none", "--no-baselines", "--out", os.path.join(folder, "a"), "--json"]
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     code = main(fit)
        >>> s = json.loads(out.getvalue().splitlines()[-1])
        >>> code, s["layer"], s["n_heads_total"], s["labelled_pairs_used"], s["n_test"], s["mode"], s["selection"]
        (0, 1, 4, 8, 16, 'zero-shot Δ', 'none')
        >>> sorted(os.listdir(s["out"]))
        ['deltas...safetensors', 'manifest.json']
        >>> shutil.rmtree(folder)
    """
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
    group_l1_rel = parse_penalties(args.group_l1_rel, "--group-l1-rel", at_most=1.0)
    if args.layers not in ("default", "all"):
        parse_layers(parse_int_list(args.layers, "--layers"), 1 << 30)  # the syntax now; the range once loaded
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
    if args.stability and args.last_positions > 1:
        raise FitError("--stability refits Δ at the last token only; drop --last-positions or --stability.")
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
        mode=args.mode,
        shots=parse_int_list(args.shots, "--shots") if args.shots is not None else None,
        last_positions=args.last_positions,
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
    zero_delta = test if result.mode.shots == 0 and result.mode.delta else None
    if zero_delta is None:
        zero_delta = evaluate(model, splits, result.intervention, shots=0, progress=not args.no_progress)
    stable = _stability(model, splits, result, args) if args.stability else None
    zero = few = None
    k = _comparison_shots(result)
    if not args.no_baselines:
        zero = evaluate(model, splits, shots=0, progress=not args.no_progress).accuracy
        few = evaluate(model, splits, shots=k, progress=not args.no_progress).accuracy
    result.intervention.save(args.out, force=args.force)
    summary = {
        "task": task.name,
        "model": args.model,
        "device": str(model.cfg.device),
        "dtype": str(model.cfg.dtype).removeprefix("torch."),
        "layer": result.layer,
        "layers": list(result.config.candidate_layers(model.cfg.n_layers)) if layer == "joint" else [result.layer],
        "last_positions": result.config.last_positions,
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
        "mode": result.mode.name,
        "mode_shots": result.mode.shots,
        "mode_delta": result.mode.delta,
        "modes": json.loads(result.modes.to_json(orient="records")) if result.modes is not None else None,
        "mode_rule": result.config.rule,
        "test_accuracy": test.accuracy,
        "zero_shot_delta_accuracy": zero_delta.accuracy,
        "n_test": test.n,
        "zero_shot_accuracy": zero,
        "few_shot_accuracy": few,
        "few_shot_shots": k,
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


def _comparison_shots(result: Any) -> int:
    """Demonstrations for the prompting baseline: as many as the fit's k-shot modes use (5 when it has none),
    so prompting + Δ is compared with prompting on the same prompts."""
    if result.mode.shots:
        return int(result.mode.shots)
    if result.modes is not None and (result.modes.shots > 0).any():
        return int(result.modes.shots.max())
    return 5


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
        f"\nTask {s['task']} on {s['model']}: {where(s)}, {len(s['selected_heads'])} of "
        f"{s['n_heads_total'] * len(s.get('layers', [0]))} heads selected ({heads}); {rule}"
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
    if s["modes"]:
        print_modes(s["modes"], s["mode_rule"])
    rows = [
        ("zero-shot prompt", s["zero_shot_accuracy"]),
        (f"{s['few_shot_shots']}-shot prompt", s["few_shot_accuracy"]),
        ("LAAI, zero-shot Δ", s["zero_shot_delta_accuracy"]),
    ]
    if s["mode"] != "zero-shot Δ":
        rows.append((f"LAAI as chosen: {s['mode']}", s["test_accuracy"]))
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
