"""The survey side of ``lens-laai fit`` / ``lens-laai eval`` (``--survey`` or ``--survey-dir``).

    lens-laai fit --survey gss-spending --group "POLVIEWS=Extremely liberal" --out runs/lib --json
    lens-laai eval --survey gss-spending --intervention runs/lib --json
    lens-laai eval --survey gss-spending --group "PARTYID=Strong Republican" --method persona

``fit`` checks every option and the output path before it loads the model, fits on the group's
training questions (layer and λ₂ chosen on the validation questions), scores the intervention and
the prompting baselines (plain, persona, few-shot) on the same held-out questions, and saves only
after that succeeded. ``eval`` reproduces a saved intervention's held-out questions from its record.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from lens_laai.errors import LensLaaiError, TaskError

STEPS, LR = 20, 1.0


def add_survey_args(p: argparse.ArgumentParser, fit: bool) -> None:
    """Add the survey options to the ``fit`` or ``eval`` parser.

    Example:
        >>> import argparse
        >>> from lens_laai.cli.opinion import add_survey_args
        >>> p = argparse.ArgumentParser()
        >>> add_survey_args(p, fit=True)
        >>> args = p.parse_args(["--survey", "gss-spending", "--group", "POLVIEWS=Liberal"])
        >>> args.survey, args.group, args.divergence, args.n_train_questions
        ('gss-spending', 'POLVIEWS=Liberal', 'kl', None)
        >>> q = argparse.ArgumentParser()
        >>> add_survey_args(q, fit=False)
        >>> q.parse_args(["--survey-dir", "opinionqa/Guns", "--method", "persona"]).method
        'persona'
    """
    p.add_argument(
        "--survey", default=None, help="survey to fit on: a bundled name (gss-spending) or our survey JSON file"
    )
    p.add_argument(
        "--survey-dir", default=None, help="a directory in OpinionQA's layout (info.csv, metadata.csv, responses.csv)"
    )
    p.add_argument("--group", default=None, help="survey group ATTRIBUTE=VALUE, e.g. 'POLVIEWS=Extremely liberal'")
    p.add_argument("--n-train-questions", type=int, default=None, help="survey training questions (default 8)")
    p.add_argument("--n-valid-questions", type=int, default=None, help="survey validation questions (default 4)")
    if fit:
        p.add_argument("--divergence", default="kl", choices=["kl", "js", "w1"], help="survey fitting objective")
    else:
        p.add_argument(
            "--method",
            default="plain",
            choices=["plain", "persona", "few_shot"],
            help="survey prompting method to score when no --intervention is given",
        )


def is_survey(args: argparse.Namespace) -> bool:
    """Whether the command is about a survey rather than a task.

    Example:
        >>> import argparse
        >>> from lens_laai.cli.opinion import is_survey
        >>> is_survey(argparse.Namespace(survey="gss-spending")), is_survey(argparse.Namespace(task="antonym"))
        (True, False)
        >>> is_survey(argparse.Namespace(survey=None, survey_dir="opinionqa/Guns"))
        True
    """
    return bool(getattr(args, "survey", None) or getattr(args, "survey_dir", None))


def fill_task_defaults(args: argparse.Namespace) -> None:
    """The task defaults of options whose survey defaults differ (left ``None`` by the parser).

    Example:
        >>> import argparse
        >>> from lens_laai.cli.opinion import fill_task_defaults
        >>> from lens_laai.fitting.fit import FitConfig
        >>> args = argparse.Namespace(l1=None, lr=0.5, n_train_questions=None, n_valid_questions=None)
        >>> fill_task_defaults(args)
        >>> args.l1 == FitConfig.l1, args.lr
        (True, 0.5)
        >>> fill_task_defaults(argparse.Namespace(l1=None, lr=None, n_train_questions=8))
        Traceback (most recent call last):
        ...
        lens_laai.errors.LensLaaiError: --n-train-questions / --n-valid-questions are for surveys; tasks use --n-train / --n-valid.
    """
    from lens_laai.fitting.fit import FitConfig

    for name, value in (("l1", FitConfig.l1), ("lr", FitConfig.lr)):
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if getattr(args, "n_train_questions", None) is not None or getattr(args, "n_valid_questions", None) is not None:
        raise LensLaaiError(
            "--n-train-questions / --n-valid-questions are for surveys; tasks use --n-train / --n-valid."
        )


def _survey(args: argparse.Namespace):
    from lens_laai.opinions.loading import load_survey

    if getattr(args, "task", None) or getattr(args, "task_file", None):
        raise LensLaaiError("Give either --task/--task-file or --survey/--survey-dir, not both.")
    if args.survey and args.survey_dir:
        raise LensLaaiError("Give either --survey or --survey-dir, not both.")
    if args.survey_dir:
        from pathlib import Path

        if not Path(args.survey_dir).is_dir():
            raise TaskError(
                f"--survey-dir {args.survey_dir!r} is not a directory (it should hold info.csv, metadata.csv "
                "and responses.csv)."
            )
    return load_survey(args.survey_dir or args.survey)


def _split_sizes(args: argparse.Namespace) -> tuple[int, int]:
    return (
        8 if args.n_train_questions is None else args.n_train_questions,
        4 if args.n_valid_questions is None else args.n_valid_questions,
    )


def fit_survey(args: argparse.Namespace) -> int:
    """``lens-laai fit --survey ...``: fit, score against the baselines on held-out questions, save.

    Example (the toy survey's group ``PARTY=Red`` on the tiny model: 3 training questions, 1 validation):
        >>> import contextlib, io, json, os, shutil, tempfile
        >>> from lens_laai.cli.main import main
        >>> from lens_laai.opinions.survey import toy_survey
        >>> folder = tempfile.mkdtemp()
        >>> with open(os.path.join(folder, "toy.json"), "w") as f:
        ...     json.dump(toy_survey().to_json(), f)
        >>> toy = ["--survey", os.path.join(folder, "toy.json"), "--model", "lens-laai-tiny", "--no-progress"]
        >>> fit = ["fit", *toy, "--group", "PARTY=Red", "--n-train-questions", "3", "--n-valid-questions", "1",
        ...        "--layer", "1", "--steps", "2", "--group-l1", "0.05", "--no-baselines",
        ...        "--out", os.path.join(folder, "red"), "--json"]
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     code = main(fit)
        >>> s = json.loads(out.getvalue().splitlines()[-1])
        >>> code, s["survey"], s["group"], s["layer"], s["n_train_questions"], s["n_valid_questions"], s["n_test_questions"]
        (0, 'toy', 'PARTY=Red', 1, 3, 1, 4)
        >>> s["test_kl"] >= 0 and 0 <= s["test_representativeness"] <= 1, s["baselines"]
        (True, None)
        >>> main(["fit", *toy, "--out", os.path.join(folder, "x"), "--json"])
        {"error": "--group ATTRIBUTE=VALUE is required with a survey, e.g. ...", "command": "fit"}
        2
        >>> shutil.rmtree(folder)
    """
    from lens_laai.cli.args import model_from_args, parse_floats, parse_int
    from lens_laai.fitting.fit import FitConfig, parse_layers
    from lens_laai.opinions.evaluate import (
        METHODS,
        check_prompt_lengths,
        compare_methods,
    )
    from lens_laai.opinions.fit import DEFAULT_GROUP_L1, DEFAULT_L1, fit_opinion
    from lens_laai.storage.bundle import check_save_path

    start = time.perf_counter()
    survey = _survey(args)
    if not args.group:
        raise TaskError(f"--group ATTRIBUTE=VALUE is required with a survey, e.g. {next(iter(survey.groups))!r}.")
    group = survey.group(args.group)
    task_only = [
        flag
        for flag, used in (
            ("--group-l1-rel", args.group_l1_rel),
            ("--select", args.select is not None),
            ("--rule", args.rule != FitConfig.rule),
            ("--cv-metric", args.cv_metric != FitConfig.cv_metric),
            ("--max-heads", args.max_heads is not None),
            ("--no-relaxed", args.no_relaxed),
            ("--stability", bool(args.stability)),
            ("--init", args.init != "zero"),
            ("--folds", args.folds != FitConfig.folds),
            ("--no-halving", args.no_halving),
            ("--mode", args.mode != "auto"),
            ("--shots", args.shots is not None),
        )
        if used
    ]
    if task_only:
        raise LensLaaiError(
            f"{', '.join(task_only)} are for tasks; survey fits choose their layer on validation "
            "questions and take absolute --group-l1 values."
        )
    layer: int | str = "sweep" if args.layer in ("auto", "sweep") else parse_int(args.layer, "--layer")
    n_train, n_valid = _split_sizes(args)
    splits = survey.split(args.seed, n_train, n_valid, args.n_test)
    if not any(k in group.answers for k in splits.train):  # checked before the model loads (issue 23)
        what = (
            "no ordinal answers at all" if not group.answers else f"none of the {len(splits.train)} training questions"
        )
        raise TaskError(f"Group {group.name!r} gave {what}; choose another group or split.")
    l1 = DEFAULT_L1 if args.l1 is None else args.l1
    group_l1 = DEFAULT_GROUP_L1 if args.group_l1 is None else parse_floats(args.group_l1, "--group-l1")
    steps, lr = STEPS if args.steps is None else args.steps, LR if args.lr is None else args.lr
    for lam in group_l1 if isinstance(group_l1, (list, tuple)) else [group_l1]:
        FitConfig(l1=l1, group_l1=lam, relative=False, steps=steps, lr=lr).validate(
            1
        )  # numbers only; layers need the model
    check_save_path(args.out, force=args.force)
    model = model_from_args(args)
    methods = () if args.no_baselines else METHODS
    check_prompt_lengths(model, survey, group.name, splits, methods)  # before any fitting
    result = fit_opinion(
        model,
        survey,
        group.name,
        layer,
        splits=splits,
        layers=parse_layers(args.layers, model.cfg.n_layers),
        l1=l1,
        group_l1=group_l1,
        steps=steps,
        lr=lr,
        divergence=args.divergence,
        progress=not args.no_progress,
    )
    scores = compare_methods(model, survey, group.name, splits, {"laai": result.intervention}, methods).summary()
    scores = scores.set_index("method")
    result.intervention.save(args.out, force=args.force)
    ours = scores.loc["laai"]
    summary: dict[str, Any] = {
        "survey": survey.name,
        "survey_hash": survey.data_hash(),
        "group": group.name,
        "model": args.model,
        "device": str(model.cfg.device),
        "layer": result.layer,
        "group_l1": result.group_l1,
        "selected_heads": [list(h) for h in result.selected_heads],
        "n_heads_total": model.cfg.n_heads,
        "n_train_questions": len(splits.train),
        "n_valid_questions": len(splits.valid),
        "n_test_questions": int(ours["n_questions"]),
        "test_questions": list(splits.test),
        "train_divergence": result.train_divergence,
        "valid_divergence": result.valid_divergence,
        "test_representativeness": float(ours["representativeness"]),
        "test_kl": float(ours["kl"]),
        "test_tv": float(ours["tv"]),
        "test_refusal_model": float(ours["refusal_model"]),
        "baselines": {m: _scores(scores.loc[m]) for m in methods} if methods else None,
        "fit_seconds": round(result.seconds, 2),
        "forward_equivalents": round(result.forward_equivalents, 1),
        "fast_path": result.fast_path,
        "out": str(args.out),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if not args.json or not args.no_progress:
        _print_fit(summary, result.sweep, scores)
    if args.json:
        print(json.dumps(summary))
    return 0


def _scores(row: Any) -> dict[str, float]:
    return {
        "representativeness": float(row["representativeness"]),
        "kl": float(row["kl"]),
        "tv": float(row["tv"]),
        "n_questions": int(row["n_questions"]),
    }


def _print_fit(s: dict[str, Any], sweep: Any, scores: Any) -> None:
    heads = ", ".join(f"L{l}H{h}" for l, h in s["selected_heads"]) or "none"
    print(
        f"\nSurvey {s['survey']}, group {s['group']!r} on {s['model']}: layer {s['layer']}, λ₂ {s['group_l1']:g}, "
        f"{len(s['selected_heads'])} of {s['n_heads_total']} heads selected ({heads})"
    )
    if len(sweep) > 1:
        print("\nLayer / λ₂ sweep (validation divergence):")
        print(sweep.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    table = scores.reset_index()[["method", "n_questions", "kl", "tv", "representativeness"]]
    print(f"\nHeld-out questions ({s['n_test_questions']}): {', '.join(s['test_questions'])}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(
        f"\nfit {s['fit_seconds']:.1f}s ({s['forward_equivalents']:.0f} forward-pass equivalents), total "
        f"{s['seconds']:.1f}s; saved to {s['out']}"
    )


def eval_survey(args: argparse.Namespace) -> int:
    """``lens-laai eval --survey ...``: a saved intervention on its held-out questions, or a prompting method.

    Example (the held-out questions come from the fit's record; a persona prompt is scored on the same ones):
        >>> import contextlib, io, json, os, shutil, tempfile
        >>> from lens_laai.cli.main import main
        >>> from lens_laai.opinions.survey import toy_survey
        >>> folder = tempfile.mkdtemp()
        >>> with open(os.path.join(folder, "toy.json"), "w") as f:
        ...     json.dump(toy_survey().to_json(), f)
        >>> toy = ["--survey", os.path.join(folder, "toy.json"), "--model", "lens-laai-tiny", "--no-progress"]
        >>> fit = ["fit", *toy, "--group", "PARTY=Red", "--n-train-questions", "3", "--n-valid-questions", "1",
        ...        "--layer", "1", "--steps", "2", "--group-l1", "0.05", "--no-baselines",
        ...        "--out", os.path.join(folder, "red"), "--json"]
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     code = main(fit)
        >>> fitted = json.loads(out.getvalue().splitlines()[-1])
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     code = main(["eval", *toy, "--intervention", os.path.join(folder, "red"), "--json"])
        >>> e = json.loads(out.getvalue().splitlines()[-1])
        >>> code, e["group"], e["method"], e["questions"] == fitted["test_questions"], e["kl"] == fitted["test_kl"]
        (0, 'PARTY=Red', 'intervention', True, True)
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     code = main(["eval", *toy, "--group", "PARTY=Red", "--n-train-questions", "3",
        ...                  "--n-valid-questions", "1", "--method", "persona", "--json"])
        >>> e = json.loads(out.getvalue().splitlines()[-1])
        >>> code, e["method"], e["questions"] == fitted["test_questions"]
        (0, 'persona', True)
        >>> shutil.rmtree(folder)
    """
    from lens_laai.cli.args import model_from_args
    from lens_laai.interventions.protocol import load_intervention
    from lens_laai.opinions.evaluate import evaluate_opinion

    start = time.perf_counter()
    survey = _survey(args)
    if args.split == "all":
        raise LensLaaiError("--split all is for tasks; for surveys use train, valid or test.")
    if args.n_train is not None or args.n_valid is not None:
        raise LensLaaiError(
            "--n-train / --n-valid count task pairs; for surveys use --n-train-questions / --n-valid-questions."
        )
    if args.intervention is None and args.strict:
        raise LensLaaiError("--strict checks an intervention against the model; give --intervention too.")
    model = model_from_args(args)
    iv = load_intervention(args.intervention, model, strict=args.strict) if args.intervention else None
    group = args.group or ((iv.metadata.get("survey") or {}).get("group") if iv is not None else None)
    if not group:
        raise TaskError("--group ATTRIBUTE=VALUE is required with a survey (it is read from a fitted intervention).")
    if iv is not None and args.method != "plain":
        raise LensLaaiError("--method scores a prompting baseline; an --intervention is scored on plain prompts.")
    result = evaluate_opinion(
        model,
        survey,
        group,
        iv,
        method=args.method,
        split=args.split,
        seed=args.seed,
        n_train=args.n_train_questions,
        n_valid=args.n_valid_questions,
        strict=args.strict,
    )
    s = result.scores()
    out = {
        "survey": survey.name,
        "group": survey.group(group).name,
        "method": "intervention" if iv else args.method,
        "intervention": args.intervention,
        "split": args.split,
        "n_questions": s["n_questions"],
        "questions": list(result.table["key"]),
        "representativeness": s["representativeness"],
        "kl": s["kl"],
        "tv": s["tv"],
        "refusal_model": s["refusal_model"],
        "seconds": round(time.perf_counter() - start, 2),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            result.table[["key", "target", "model", "kl", "tv", "w1"]].to_string(
                index=False, float_format=lambda x: f"{x:.3f}"
            )
        )
        print(
            f"\n{out['method']}: representativeness {s['representativeness']:.3f}, KL {s['kl']:.3f}, TV {s['tv']:.3f} "
            f"on {s['n_questions']} {args.split} questions"
        )
    return 0
